//! The data pattern every test writes and checks: deterministic bytes that differ at every 8-byte
//! word of a disk and from one seed to another, so data that lands in the wrong place, comes
//! from the wrong offset or was left by another step of the test is caught. A buffer taken from
//! byte `offset` of a disk holds what the whole disk would hold there, whatever the buffer's
//! size and alignment.
//!
//! Also here: a small PRNG for reproducible random choices, and the byte comparison that names
//! the first difference instead of dumping two buffers.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// splitmix64 of (seed, word index): every 8-byte word of every seed differs.
fn mix(seed: u64, word: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(word)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern for `seed` as it would appear at byte `offset` of a disk.
pub fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    let mut i = 0;
    while i < buf.len() {
        let pos = offset + i as u64;
        let word = mix(seed, pos / 8).to_le_bytes();
        let k = (pos % 8) as usize;
        let n = (8 - k).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[k..k + n]);
        i += n;
    }
}

/// `len` bytes of the pattern for `seed`, as at byte `offset` of a disk.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed, offset);
    v
}

/// Writes a non-sparse image of `size` bytes holding `pattern(seed, 0, size)` and returns its
/// contents (the model a test updates as it writes).
pub fn create_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let data = pattern(seed, 0, size as usize);
    let mut f =
        File::create(path).unwrap_or_else(|e| panic!("create image {}: {e}", path.display()));
    f.write_all(&data)
        .unwrap_or_else(|e| panic!("write image {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("sync image {}: {e}", path.display()));
    data
}

/// A small deterministic PRNG (xorshift64*) so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed, 0x5eed) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Describes where the first difference between two buffers is, for assertion messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        // memcmp: the common case stays fast in unoptimised test builds.
        return None;
    }
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i..got.len())
        .find(|&j| got[j] == want[j])
        .unwrap_or(got.len());
    Some(format!(
        "first difference at byte {i} (sector {}), differing run of {} bytes: got {:02x?} want {:02x?}",
        i / 512,
        end - i,
        &got[i..(i + 16).min(got.len())],
        &want[i..(i + 16).min(want.len())]
    ))
}

/// Panics unless `got == want`, naming the first difference (see [`first_difference`]).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(diff) = first_difference(got, want) {
        panic!("{what}: {diff}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_holds_what_the_whole_disk_holds_there() {
        let whole = pattern(7, 0, 4096);
        for (offset, len) in [(0, 1), (3, 13), (8, 8), (511, 1030), (4000, 96)] {
            assert_eq!(
                pattern(7, offset, len),
                whole[offset as usize..offset as usize + len],
                "offset {offset} len {len}"
            );
        }
    }

    #[test]
    fn words_and_seeds_differ() {
        let a = pattern(1, 0, 1 << 16);
        let b = pattern(2, 0, 1 << 16);
        let words: std::collections::HashSet<&[u8]> = a.chunks(8).chain(b.chunks(8)).collect();
        assert_eq!(words.len(), 2 * (1 << 16) / 8);
    }

    #[test]
    fn first_difference_names_the_byte_and_the_run() {
        let want = pattern(3, 0, 2048);
        let mut got = want.clone();
        got[600..604].fill(0);
        let diff = first_difference(&got, &want).expect("they differ");
        assert!(diff.contains("byte 600 (sector 1)"), "{diff}");
        assert!(diff.contains("run of 4 bytes"), "{diff}");
        assert_eq!(first_difference(&want, &want), None);
    }
}
