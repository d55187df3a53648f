/work/main/balancer-ebpf/target/ebpf/release/deps/which-7d828671f3bbeef9.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/checker.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/error.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/finder.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/helper.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/sys.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libwhich-7d828671f3bbeef9.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/checker.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/error.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/finder.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/helper.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/sys.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libwhich-7d828671f3bbeef9.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/checker.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/error.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/finder.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/helper.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/sys.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/checker.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/error.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/finder.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/helper.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/which-8.0.6/src/sys.rs:
