#!/usr/bin/env bash
# What the tests need, installed when missing (PostgreSQL, SIPp, tshark, Kamailio, openssl, python3-venv:
# Debian packages; Twilio's Python helper library into target/twilio-venv). Sourced by
# tests/run.sh and tests/coverage.sh.

need=()
have_pg() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}
have_pg || need+=(postgresql)
command -v sipp >/dev/null || need+=(sip-tester)
command -v tshark >/dev/null || need+=(tshark)
command -v kamailio >/dev/null || need+=(kamailio)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Twilio's own Python helper library signs a request in the Twilio tests (the primary source
# for its signature format).
venv=target/twilio-venv
if ! "$venv/bin/python" -c 'import twilio.request_validator' 2>/dev/null; then
    echo "tests/run.sh: installing Twilio's Python library into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'twilio>=9.13,<10'
fi

