/work/main/balancer-ebpf/target/ebpf/release/deps/num_derive-70824ac489b540d9.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/num-derive-0.4.2/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libnum_derive-70824ac489b540d9.so: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/num-derive-0.4.2/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/num-derive-0.4.2/src/lib.rs:
