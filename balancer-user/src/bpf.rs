//! The bpf(2) commands for pinned XDP links and for counting a pinned map's entries, which aya
//! 0.14 does not expose on pinned objects: creating a link and pinning it, opening a pin,
//! reading a link's program and interface, and swapping the program behind a link; and the
//! batched map update, which aya has not at all.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE` and `XDP_FLAGS_DRV_MODE`.
pub const XDP_GENERIC: u32 = 1 << 1;
pub const XDP_NATIVE: u32 = 1 << 2;
/// Enough of `union bpf_attr` for every command here; the kernel ignores the zero tail.
const ATTR_SIZE: usize = 64;
/// `struct bpf_link_info` up to its XDP member: type, id, prog_id, then the 8-aligned union
/// whose `xdp.ifindex` comes first.
const LINK_INFO_SIZE: usize = 24;

/// What the kernel says of an XDP link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub program_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
}

fn bpf(command: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of `ATTR_SIZE` bytes for `command`,
    // and every pointer it holds refers to memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            ATTR_SIZE as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u64) {
    attr[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))
}

/// Opens a pinned object (link or map).
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let name = c_path(path).map_err(io::Error::other)?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, name.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Pins an object at `path`, which then keeps it alive after every descriptor is closed.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let name = c_path(path)?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, name.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

/// Attaches `program` to an interface through a new XDP link (`flags`: [`XDP_NATIVE`] or
/// [`XDP_GENERIC`]).
pub fn create_xdp_link(program: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, program.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, BPF_XDP);
    put_u32(&mut attr, 12, flags);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Replaces the program behind a link in one step: every packet runs either the old program
/// or the new one.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, program.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = [0u8; LINK_INFO_SIZE];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, LINK_INFO_SIZE as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let field = |offset: usize| {
        u32::from_ne_bytes([
            info[offset],
            info[offset + 1],
            info[offset + 2],
            info[offset + 3],
        ])
    };
    Ok(LinkInfo {
        id: field(4),
        program_id: field(8),
        ifindex: field(16),
    })
}

/// Writes `count` entries to a map in one call, `keys` and `values` holding them back to
/// back. On an error, how many entries were written before the one that failed.
pub fn update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: u32,
) -> Result<(), (u32, io::Error)> {
    // `batch` of `union bpf_attr`: in_batch, out_batch, keys, values, count, map_fd,
    // elem_flags (0: create or replace), flags.
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 16, keys.as_ptr() as u64);
    put_u64(&mut attr, 24, values.as_ptr() as u64);
    put_u32(&mut attr, 32, count);
    put_u32(&mut attr, 36, map.as_raw_fd() as u32);
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
        .map(drop)
        .map_err(|error| {
            // The kernel writes back how many it did.
            let done = u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]);
            (done, error)
        })
}

/// Entries of a pinned hash map with keys of `key_size` bytes, counted up to `limit`.
pub fn count_entries(map: BorrowedFd<'_>, key_size: usize, limit: u64) -> io::Result<u64> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0;
    let mut first = true;
    while count < limit {
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, map.as_raw_fd() as u32);
        // A null key asks for the first one.
        let key_ptr = if first { 0 } else { key.as_ptr() as u64 };
        put_u64(&mut attr, 8, key_ptr);
        put_u64(&mut attr, 16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => break,
            Err(error) => return Err(error),
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        count += 1;
    }
    Ok(count)
}
