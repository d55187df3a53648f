//! A minimal XDP program for the lab, loaded from raw instructions (no toolchain needed):
//! it passes every frame, or drops a given share of them at random. The relay attaches the
//! first to a port that frames are redirected into (a veth drops such frames unless it runs
//! XDP or has GRO on); `lab-drop` attaches the second to make a link lossy.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{bail, Context, Result};

const XDP_DROP: u64 = 1;
const XDP_PASS: u64 = 2;
/// `bpf_get_prandom_u32`.
const HELPER_PRANDOM: u64 = 7;

/// Attaches the program to `ifindex` in native mode through a BPF link, which lives as long
/// as the returned descriptor; `drop_percent` of the frames are dropped (0: none).
pub fn attach(ifindex: u32, drop_percent: f64) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    if !(0.0..=50.0).contains(&drop_percent) {
        bail!("a drop rate of {drop_percent}% is outside 0-50%");
    }
    // Instructions: opcode | dst << 8 | src << 12 | offset << 16 | immediate << 32.
    let program: Vec<u64> = if drop_percent == 0.0 {
        // r0 = XDP_PASS; exit
        vec![0xb7 | XDP_PASS << 32, 0x95]
    } else {
        // Random in [0, 2^32): drop when it is at most the threshold.
        let threshold = (drop_percent / 100.0 * f64::from(u32::MAX)) as u64;
        vec![
            0x85 | HELPER_PRANDOM << 32,      // call bpf_get_prandom_u32
            0x25 | 2 << 16 | threshold << 32, // if r0 > threshold goto +2
            0xb7 | XDP_DROP << 32,            // r0 = XDP_DROP
            0x95,                             // exit
            0xb7 | XDP_PASS << 32,            // r0 = XDP_PASS
            0x95,                             // exit
        ]
    };
    let license = b"GPL\0";

    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"lab_xdp\0\0\0\0\0\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    // SAFETY: a bpf_attr prefix for BPF_PROG_LOAD whose pointers outlive the call.
    let prog = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoad,
            size_of::<ProgLoad>(),
        )
    };
    check(prog, "loading the lab's XDP program")?;
    // SAFETY: a new descriptor nobody else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as RawFd) };

    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let create = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    // SAFETY: a bpf_attr prefix for BPF_LINK_CREATE.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &create as *const LinkCreate,
            size_of::<LinkCreate>(),
        )
    };
    check(link, "linking the lab's XDP program")?;
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(link as RawFd) })
}

/// The index of interface `name` in this namespace.
pub fn interface_index(name: &str) -> Result<u32> {
    let c_name = CString::new(name).context("an interface name with a NUL byte")?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("no interface {name} in this namespace");
    }
    Ok(index)
}

fn check(rc: libc::c_long, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
