use std::io;

use block_device::BlockDevice;

/// A device that reads zeroes and drops writes: the protocol path without a disk.
#[derive(Debug)]
pub struct NullStore {
    size_bytes: u64,
}

impl NullStore {
    /// A null device of `size_bytes`.
    pub fn new(size_bytes: u64) -> NullStore {
        NullStore { size_bytes }
    }
}

impl BlockDevice for NullStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn read_cached(&self, _offset: u64, buf: &mut [u8]) -> bool {
        buf.fill(0);
        true
    }
    fn write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn supports_discard(&self) -> bool {
        false
    }
}
