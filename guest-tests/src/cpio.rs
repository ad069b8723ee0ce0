//! A writer for the cpio "newc" format, the one the kernel unpacks as an initramfs.
//!
//! Written here instead of calling `cpio(1)` so the test suite needs one package less. The format
//! (kernel's Documentation/driver-api/early-userspace/buffer-format.rst): each entry is a
//! 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the NUL-terminated name padded
//! to a multiple of 4 bytes, then the data padded likewise; `TRAILER!!!` ends the archive. The
//! kernel accepts several archives one after the other, which is how a test's job is appended to
//! the cached base image without rewriting it.

use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams newc entries into `W`. Call [`Writer::finish`] to write the trailer.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            // Inode numbers only need to be distinct within the archive (the kernel uses them to
            // spot hard links, and nlink is always 1 here).
            next_ino: 1,
        }
    }

    /// A directory; parents must come first (the kernel does not create them).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | mode, 0, &[])
    }

    /// A regular file with the given permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 0, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 0, target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, (major << 16) | minor, &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let ino = if mode == 0 { 0 } else { self.next_ino };
        self.next_ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino,
            mode,
            0,                             // uid
            0,                             // gid
            if mode == 0 { 0 } else { 1 }, // nlink
            0,                             // mtime: fixed, so the same inputs give the same bytes
            size,
            0, // devmajor
            0, // devminor
            rdev >> 16,
            rdev & 0xffff,
            namesize,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut w = Writer::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/x", 0o755, b"hello").unwrap();
        w.symlink("/bin/y", "x").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);

        // Walk the archive the way the kernel does.
        let mut off = 0;
        let mut names = Vec::new();
        loop {
            assert_eq!(&buf[off..off + 6], b"070701", "magic at {off}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[off + 6 + 8 * i..off + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&buf[off + 110..off + 110 + namesize - 1]).unwrap();
            let data_off = (off + 110 + namesize).next_multiple_of(4);
            let data = &buf[data_off..data_off + size];
            names.push((name.to_string(), mode as u32, data.to_vec()));
            off = (data_off + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(off, buf.len());
        assert_eq!(names[0], ("bin".into(), S_IFDIR | 0o755, vec![]));
        assert_eq!(
            names[1],
            ("bin/x".into(), S_IFREG | 0o755, b"hello".to_vec())
        );
        assert_eq!(names[2], ("bin/y".into(), S_IFLNK | 0o777, b"x".to_vec()));
    }
}
