//! Every fuzz target over its seeds (`tests/fuzz/seeds/<target>/`, and for SIP the RFC 4475
//! torture set) and over every input a fuzzer crashed it with (`tests/fuzz/regressions/
//! <target>/`, kept after the fix): none may panic. Part of the README's test command.

use std::path::{Path, PathBuf};

use precall_fuzz_targets::TARGETS;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_every_past_crash_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, target) in TARGETS {
        let mut inputs = files(&root.join("fuzz/seeds").join(name));
        assert!(!inputs.is_empty(), "{name}: no seeds in tests/fuzz/seeds/{name}");
        if *name == "sip_datagram" {
            let torture = files(&root.join("../engine/sip/tests/torture"));
            assert!(torture.len() > 40, "the RFC 4475 set is missing");
            inputs.extend(torture);
        }
        inputs.extend(files(&root.join("fuzz/regressions").join(name)));
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name} panicked on {}", input.display());
        }
    }
}

/// The libFuzzer crate has one target per function here, and no other.
#[test]
fn the_fuzz_crate_wraps_every_target() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut wrapped: Vec<String> =
        files(&dir).iter().filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned())).collect();
    wrapped.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    names.sort();
    assert_eq!(wrapped, names);
    for name in &names {
        let body = std::fs::read_to_string(dir.join(format!("{name}.rs"))).unwrap();
        assert!(body.contains(&format!("precall_fuzz_targets::{name}(")), "{name}.rs");
    }
}
