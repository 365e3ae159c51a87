"""What the load scripts share: SIPp scenario text and free loopback ports."""
import os, socket

HERE = os.path.dirname(os.path.abspath(__file__))


def hold_scenario(hold_ms, accept_503=False):
    """benches/sipp/uac_hold.xml with its pause set to `hold_ms`; with `accept_503`, a call
    precall refuses with 503 (overload admission, a full shard, a drain) is ACKed and ends as
    refused instead of failed, so SIPp's failed count is the admitted calls that failed."""
    scenario = open(os.path.join(HERE, "uac_hold.xml")).read()
    scenario = scenario.replace('<pause milliseconds="3000"/>', f'<pause milliseconds="{hold_ms}"/>')
    if accept_503:
        # 503 -> ACK (same Via, so the same transaction) -> end; the admitted calls skip that part.
        refused = open(os.path.join(HERE, "accept_503.xml")).read().split("-->", 1)[1]
        scenario = scenario.replace('<recv response="200" rtd="true" rrs="true">',
                                    '<recv response="503" optional="true" next="refused">\n  </recv>\n\n'
                                    '  <recv response="200" rtd="true" rrs="true">', 1)
        scenario = scenario.replace('<recv response="200" crlf="true">', '<recv response="200" crlf="true" next="done">', 1)
        scenario = scenario.replace('  <ResponseTimeRepartition', refused + '\n  <ResponseTimeRepartition', 1)
        assert scenario.count('id="refused"') == 1 and 'next="done"' in scenario
    return scenario


def free_port(kind):
    """A loopback port of `kind` (socket.SOCK_DGRAM or SOCK_STREAM) free now."""
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
