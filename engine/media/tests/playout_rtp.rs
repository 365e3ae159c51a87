//! A shard's media loop in miniature: clock + sender + playout, packets emitted and parsed
//! back, with a fake clock. Checks that sequence numbers and timestamps stay continuous across
//! clip switches and wrap-around, and that payloads are the clips' frames.

use std::time::{Duration, Instant};

use precall_media::*;

struct Call {
    stream: StreamSlot,
    sender: RtpSender,
    playout: Playout,
    codec: Codec,
    /// Every datagram "sent" (a real shard sends header + payload as two iovecs).
    sent: Vec<Vec<u8>>,
}

fn clip(frames: usize, level: i16) -> EncodedClip {
    EncodedClip::from_pcm(&vec![level; frames * FRAME_SAMPLES])
}

#[test]
fn headers_stay_continuous_across_switches_and_wraps() {
    let (greeting, hold, error) = (clip(5, 1000), clip(3, -2000), clip(4, 3000));
    let start = Instant::now();
    let mut clock = MediaClock::new(FRAME_DURATION, start);
    let mut calls: Vec<Call> = (0..3u16)
        .map(|i| Call {
            stream: clock.add_stream(start),
            // Start close to both wraps.
            sender: RtpSender::new(
                Ssrc(0xC0DE_0000 + u32::from(i)),
                SeqNo(65_530 + i),
                RtpTimestamp(u32::MAX - 1000 + u32::from(i)),
            ),
            playout: Playout::with_items([
                PlayItem::once(greeting.clone()),
                PlayItem::forever(hold.clone()),
            ]),
            codec: if i == 1 { Codec::Pcma } else { Codec::Pcmu },
            sent: Vec::new(),
        })
        .collect();

    let mut due = Vec::new();
    let mut replaced = false;
    while let Some(now) = clock.poll_timeout() {
        if now > start + Duration::from_secs(1) {
            break;
        }
        if !replaced && now >= start + Duration::from_millis(300) {
            // The clone failed: every call switches to the error clip mid-hold.
            for c in &mut calls {
                c.playout.replace([PlayItem::once(error.clone())]);
            }
            replaced = true;
        }
        due.clear();
        clock.poll_due(now, &mut due);
        for d in &due {
            let call = calls.iter_mut().find(|c| c.stream == d.stream).unwrap();
            call.sender.skip(d.skipped);
            match call.playout.tick() {
                PlayoutTick::Frame { clip, index } => {
                    let header = call.sender.next_header(call.codec.payload_type());
                    let payload = clip.frame(call.codec, index);
                    let mut datagram = vec![0u8; RTP_HEADER_LEN];
                    header.emit(&mut datagram);
                    datagram.extend_from_slice(payload);
                    call.sent.push(datagram);
                }
                PlayoutTick::Finished => {
                    assert!(clock.remove_stream(d.stream));
                }
            }
        }
    }
    assert!(clock.is_empty(), "every call finished its error clip");

    for c in &calls {
        // 15 frames of greeting + hold before 300 ms, then the 4 error frames.
        assert_eq!(c.sent.len(), 15 + 4, "{:?}", c.sender.ssrc());
        let packets: Vec<RtpPacket<&[u8]>> =
            c.sent.iter().map(|d| RtpPacket::new_checked(&d[..]).unwrap()).collect();
        let mut ext = ExtendedSeq::new(packets[0].sequence());
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(p.payload_type(), c.codec.payload_type());
            assert_eq!(p.ssrc(), c.sender.ssrc());
            assert_eq!(p.marker(), i == 0, "marker only on the first packet");
            assert_eq!(p.payload().len(), 160);
            if i > 0 {
                let prev = &packets[i - 1];
                assert_eq!(p.sequence(), prev.sequence().next());
                assert_eq!(p.timestamp().delta(prev.timestamp()), 160);
                assert!(matches!(ext.update(p.sequence()), SeqUpdate::Advanced { .. }));
            }
        }
        assert_eq!(ext.extended_max(), ext.expected() - 1 + u64::from(packets[0].sequence().0));
        // Payload order: greeting x5, hold x3 x3 (mid-loop when replaced), then error x4.
        let level = |p: &RtpPacket<&[u8]>| c.codec.decode(p.payload()[0]);
        let levels: Vec<i16> = packets.iter().map(level).collect();
        let q = |x: i16| c.codec.decode(c.codec.encode(x));
        let mut want = vec![q(1000); 5];
        want.extend(vec![q(-2000); 10]);
        want.extend(vec![q(3000); 4]);
        assert_eq!(levels, want);
    }
}

#[test]
fn a_late_shard_skips_time_not_packets() {
    let hold = clip(2, 500);
    let start = Instant::now();
    let mut clock = MediaClock::new(FRAME_DURATION, start);
    let stream = clock.add_stream(start);
    let mut sender = RtpSender::new(Ssrc(1), SeqNo(65_535), RtpTimestamp(0));
    let mut playout = Playout::with_items([PlayItem::forever(hold)]);
    let mut headers = Vec::new();
    let mut due = Vec::new();
    // On time at 0 and 20 ms, then the shard stalls until 95 ms, then on time again.
    for now in [0, 20, 95, 100, 120].map(|ms| start + Duration::from_millis(ms)) {
        due.clear();
        clock.poll_due(now, &mut due);
        for d in &due {
            assert_eq!(d.stream, stream);
            sender.skip(d.skipped);
            assert!(matches!(playout.tick(), PlayoutTick::Frame { .. }));
            headers.push(sender.next_header(0));
        }
    }
    let seqs: Vec<u16> = headers.iter().map(|h| h.sequence.0).collect();
    let ts: Vec<u32> = headers.iter().map(|h| h.timestamp.0).collect();
    // At 95 ms the 40 ms frame is sent with the 60 ms and 80 ms ones skipped: one packet, and
    // its timestamp is that of 80 ms.
    assert_eq!(seqs, [65_535, 0, 1, 2, 3]);
    assert_eq!(ts, [0, 160, 640, 800, 960]);
}
