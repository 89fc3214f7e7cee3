//! SHA-256 content digests, computed while bytes stream past.

use std::io::{self, Read, Write};

use oci_spec::image::{Digest, Sha256Digest};
use sha2::{Digest as _, Sha256};

/// The digest of `bytes`, as `sha256:<hex>`.
pub fn sha256_of(bytes: &[u8]) -> Digest {
    finish(Sha256::digest(bytes).into())
}

fn finish(raw: [u8; 32]) -> Digest {
    let hex = hex::encode(raw);
    // A 64-character lowercase hex string is always a valid SHA-256 digest.
    let parsed: Sha256Digest = hex
        .parse()
        .unwrap_or_else(|_| unreachable!("hex::encode yields lowercase hex"));
    parsed.into()
}

/// A writer that forwards to `inner` and hashes and counts what `inner` accepted.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The wrapped writer, the digest and the number of bytes written.
    pub fn into_parts(self) -> (W, Digest, u64) {
        (self.inner, finish(self.hasher.finalize().into()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what it hands out.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The digest and the number of bytes read so far.
    pub fn finish(self) -> (Digest, u64) {
        (finish(self.hasher.finalize().into()), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        self.len += read as u64;
        Ok(read)
    }
}

/// The hex part of a `sha256:` digest, or `None` for any other algorithm.
pub fn sha256_hex(digest: &Digest) -> Option<&str> {
    match digest.algorithm() {
        oci_spec::image::DigestAlgorithm::Sha256 => Some(digest.digest()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_of_empty_input() {
        assert_eq!(
            sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn writer_and_reader_agree_with_one_shot_digest() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = HashingWriter::new(Vec::new());
        for chunk in data.chunks(777) {
            writer.write_all(chunk).unwrap();
        }
        let (copy, written_digest, written) = writer.into_parts();
        assert_eq!(copy, data);
        assert_eq!(written, data.len() as u64);
        assert_eq!(written_digest, sha256_of(&data));

        let mut reader = HashingReader::new(data.as_slice());
        io::copy(&mut reader, &mut io::sink()).unwrap();
        let (read_digest, read) = reader.finish();
        assert_eq!(read, data.len() as u64);
        assert_eq!(read_digest, sha256_of(&data));
    }
}
