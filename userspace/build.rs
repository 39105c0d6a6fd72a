//! Embeds the XDP object when `cargo xtask build-ebpf` has produced it; otherwise embeds nothing
//! and the daemon reports XDP as unavailable.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = std::env::var_os("PORTCULLIS_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest
                .join("../ebpf/portcullis-ebpf/target/bpfel-unknown-none/release/portcullis-ebpf")
        });
    println!("cargo:rerun-if-env-changed=PORTCULLIS_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("portcullis-ebpf.o");
    let bytes = std::fs::read(&object).unwrap_or_default();
    if let Err(e) = std::fs::write(&out, bytes) {
        println!("cargo:warning=cannot write {}: {e}", out.display());
    }
}
