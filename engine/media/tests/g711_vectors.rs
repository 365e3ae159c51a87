//! Compares the codec with the reference tables in `vectors/g711.json` (CPython 3.11 `audioop`;
//! the generating command is in the file's `comment` field).

use precall_media::g711::{alaw_decode, alaw_encode, ulaw_decode, ulaw_encode};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("vectors/g711.json")).expect("g711.json is valid JSON")
}

fn table(v: &Value, key: &str) -> Vec<i64> {
    let t: Vec<i64> =
        v[key].as_array().expect(key).iter().map(|x| x.as_i64().expect("integer")).collect();
    assert_eq!(t.len(), 256, "{key} has 256 entries");
    t
}

#[test]
fn comment_names_the_generator() {
    let v = vectors();
    let comment = v["comment"].as_str().expect("comment");
    assert!(comment.contains("audioop") && comment.contains("gen_g711.py"), "{comment}");
}

#[test]
fn ulaw_decode_matches_audioop() {
    let t = table(&vectors(), "ulaw_decode");
    for (code, &want) in t.iter().enumerate() {
        assert_eq!(i64::from(ulaw_decode(code as u8)), want, "mu-law code {code:#04x}");
    }
}

#[test]
fn alaw_decode_matches_audioop() {
    let t = table(&vectors(), "alaw_decode");
    for (code, &want) in t.iter().enumerate() {
        assert_eq!(i64::from(alaw_decode(code as u8)), want, "A-law code {code:#04x}");
    }
}

#[test]
fn encode_sweep_matches_audioop() {
    let v = vectors();
    let rows = v["encode"].as_array().expect("encode");
    assert!(rows.len() > 3000, "sweep has {} rows", rows.len());
    for row in rows {
        let row: Vec<i64> =
            row.as_array().expect("row").iter().map(|x| x.as_i64().unwrap()).collect();
        let x = i16::try_from(row[0]).expect("i16 input");
        assert_eq!(i64::from(ulaw_encode(x)), row[1], "mu-law encode({x})");
        assert_eq!(i64::from(alaw_encode(x)), row[2], "A-law encode({x})");
    }
}
