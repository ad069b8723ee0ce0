//! The fuzz smoke test: every target's body over its seed corpus (`fuzz/corpus/TARGET/`) and
//! over every input that ever crashed it and was fixed (`fuzz/regressions/TARGET/`), so the
//! normal test suite replays each crash found. `scripts/fuzz.sh` runs the real fuzzing.

use std::path::{Path, PathBuf};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let seeds = inputs("corpus", target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for path in seeds.iter().chain(&inputs("regressions", target)) {
        let data = std::fs::read(path).expect("read an input");
        eprintln!("{target}: {}", path.display());
        run(&data);
    }
    // Edges every target must take in its stride.
    run(&[]);
    run(&[0xff; 4096]);
}

#[test]
fn request() {
    replay("request", vublk_fuzz::request::run);
}

#[test]
fn session() {
    replay("session", vublk_fuzz::session::run);
}

#[test]
fn memory() {
    replay("memory", vublk_fuzz::memory::run);
}

#[test]
fn inflight() {
    replay("inflight", vublk_fuzz::inflight::run);
}
