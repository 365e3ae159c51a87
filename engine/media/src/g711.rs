//! ITU-T G.711 mu-law and A-law, bit-exact with the Sun reference `g711.c` that CPython's
//! `audioop` also uses (`tests/vectors/g711.json` holds its tables).
//!
//! Encoding takes 16-bit linear PCM and, like the reference, truncates it to the 14-bit
//! (mu-law) or 13-bit (A-law) range G.711 is defined on by an arithmetic shift: that is why
//! `-1` encodes to mu-law `0x7E` (decodes to -8) and not to a zero code. Decoding is a lookup
//! in a 256-entry table built at compile time.

/// Mu-law code of linear 0 (`encode(0)`); `0x7F` ("negative zero") decodes to 0 as well.
pub const ULAW_SILENCE: u8 = 0xFF;
/// A-law code of linear 0. It decodes to 8: A-law has no zero level.
pub const ALAW_SILENCE: u8 = 0xD5;

/// Mu-law bias, in the 14-bit domain the reference works in (0x84 = 132 at 16 bits).
const ULAW_BIAS_14: i32 = 0x84 >> 2;
/// Largest 14-bit magnitude that still fits once the bias is added (32635 at 16 bits).
const ULAW_CLIP_14: i32 = 8159;

/// Encodes one 16-bit sample to mu-law.
#[must_use]
pub fn ulaw_encode(sample: i16) -> u8 {
    // 14-bit two's complement, rounding towards -inf exactly as the reference does.
    let v = i32::from(sample) >> 2;
    let (magnitude, mask) = if v < 0 { (-v, 0x7F) } else { (v, 0xFF) };
    let biased = magnitude.min(ULAW_CLIP_14) + ULAW_BIAS_14; // 33..=8192
    // Segment = position of the leading one above bit 5 (segment ends 0x3F, 0x7F, …, 0x1FFF).
    let segment = (i32::BITS - biased.leading_zeros()).saturating_sub(6);
    if segment >= 8 {
        return 0x7F ^ mask;
    }
    let mantissa = (biased >> (segment + 1)) & 0x0F;
    // Both operands are below 0x80, so the value fits in a byte.
    ((segment << 4) as u8 | mantissa as u8) ^ mask
}

/// Decodes one mu-law code to 16-bit linear PCM.
#[must_use]
pub fn ulaw_decode(code: u8) -> i16 {
    ULAW_TO_LINEAR[usize::from(code)]
}

/// Encodes one 16-bit sample to A-law.
#[must_use]
pub fn alaw_encode(sample: i16) -> u8 {
    // 13-bit two's complement; negative values are mirrored as -v - 1 so that the magnitude
    // stays within 0..=4095.
    let v = i32::from(sample) >> 3;
    let (magnitude, mask) = if v >= 0 { (v, 0xD5) } else { (-v - 1, 0x55) };
    // Segment ends 0x1F, 0x3F, …, 0xFFF: the leading one above bit 4.
    let segment = (i32::BITS - magnitude.leading_zeros()).saturating_sub(5);
    if segment >= 8 {
        return 0x7F ^ mask;
    }
    let shift = if segment < 2 { 1 } else { segment };
    let mantissa = (magnitude >> shift) & 0x0F;
    ((segment << 4) as u8 | mantissa as u8) ^ mask
}

/// Decodes one A-law code to 16-bit linear PCM.
#[must_use]
pub fn alaw_decode(code: u8) -> i16 {
    ALAW_TO_LINEAR[usize::from(code)]
}

/// Encodes `pcm` to mu-law into `out`, sample by sample, over the shorter of the two.
pub fn ulaw_encode_slice(pcm: &[i16], out: &mut [u8]) {
    out.iter_mut().zip(pcm).for_each(|(o, &s)| *o = ulaw_encode(s));
}

/// Encodes `pcm` to A-law into `out`, sample by sample, over the shorter of the two.
pub fn alaw_encode_slice(pcm: &[i16], out: &mut [u8]) {
    out.iter_mut().zip(pcm).for_each(|(o, &s)| *o = alaw_encode(s));
}

/// Decodes mu-law `codes` into `out`, over the shorter of the two.
pub fn ulaw_decode_slice(codes: &[u8], out: &mut [i16]) {
    out.iter_mut().zip(codes).for_each(|(o, &c)| *o = ulaw_decode(c));
}

/// Decodes A-law `codes` into `out`, over the shorter of the two.
pub fn alaw_decode_slice(codes: &[u8], out: &mut [i16]) {
    out.iter_mut().zip(codes).for_each(|(o, &c)| *o = alaw_decode(c));
}

static ULAW_TO_LINEAR: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = ulaw_to_linear(code as u8);
        code += 1;
    }
    table
};

static ALAW_TO_LINEAR: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = alaw_to_linear(code as u8);
        code += 1;
    }
    table
};

/// The reference `ulaw2linear`: bits are stored inverted; `(mantissa * 8 + bias) << segment`.
const fn ulaw_to_linear(code: u8) -> i16 {
    let u = !code;
    let t = ((((u & 0x0F) as i32) << 3) + 0x84) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// The reference `alaw2linear`: even bits are stored inverted (XOR 0x55); sign bit set = positive.
const fn alaw_to_linear(code: u8) -> i16 {
    let a = code ^ 0x55;
    let mut t = ((a & 0x0F) as i32) << 4;
    let segment = (a & 0x70) >> 4;
    match segment {
        0 => t += 8,
        1 => t += 0x108,
        _ => t = (t + 0x108) << (segment - 1),
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_md_values() {
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(ulaw_decode(0x7F), 0);
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
        assert_eq!(alaw_decode(0x2A), -32256);
        assert_eq!(alaw_decode(0xAA), 32256);
        assert_eq!(ULAW_SILENCE, ulaw_encode(0));
        assert_eq!(ALAW_SILENCE, alaw_encode(0));
    }

    #[test]
    fn clipping_at_the_extremes() {
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(alaw_encode(i16::MAX), 0xAA);
        assert_eq!(alaw_encode(i16::MIN), 0x2A);
    }

    #[test]
    fn ulaw_round_trips_every_code() {
        for code in 0..=255u8 {
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(ulaw_encode(ulaw_decode(code)), expected, "code {code:#04x}");
        }
    }

    #[test]
    fn alaw_round_trips_every_code() {
        for code in 0..=255u8 {
            assert_eq!(alaw_encode(alaw_decode(code)), code, "code {code:#04x}");
        }
    }

    #[test]
    fn encoding_is_monotonic_in_the_decoded_level() {
        // Over the whole i16 range, a larger input never decodes to a smaller level.
        let mut prev_u = i16::MIN;
        let mut prev_a = i16::MIN;
        for x in i16::MIN..=i16::MAX {
            let u = ulaw_decode(ulaw_encode(x));
            let a = alaw_decode(alaw_encode(x));
            assert!(u >= prev_u && a >= prev_a, "at {x}");
            prev_u = u;
            prev_a = a;
        }
    }

    #[test]
    fn slices() {
        let pcm = [0i16, 1000, -1000, i16::MAX];
        let mut u = [0u8; 4];
        let mut a = [0u8; 4];
        ulaw_encode_slice(&pcm, &mut u);
        alaw_encode_slice(&pcm, &mut a);
        let mut back = [0i16; 4];
        ulaw_decode_slice(&u, &mut back);
        assert_eq!(back[0], 0);
        alaw_decode_slice(&a, &mut back);
        assert_eq!(back[0], 8);
    }
}
