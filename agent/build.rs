// SPDX-License-Identifier: MIT
//! Compiles the kernel programs in `../ebpf` with clang into `OUT_DIR`, twice: `redirect.bpf.o`
//! reads the connecting task with CO-RE (needs kernel BTF), `redirect-procfs.bpf.o` does not
//! (the fallback). `redirect::OBJECT` and `redirect::OBJECT_PROCFS` embed them with
//! `include_bytes!`, so the agent ships as one file.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let source = ebpf.join("redirect.bpf.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", ebpf.join("maps.h").display());
    println!("cargo:rerun-if-changed={}", ebpf.join("task.h").display());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=LLVM_STRIP");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The object is architecture-neutral; only the host's asm/ headers are needed to parse
    // <linux/bpf.h>, whatever the Rust target is.
    let host_multiarch = if cfg!(target_arch = "aarch64") { "aarch64-linux-gnu" } else { "x86_64-linux-gnu" };
    for (name, defines) in [("redirect.bpf.o", &["-DGPA_TASK_BTF"][..]), ("redirect-procfs.bpf.o", &[][..])] {
        let object = out.join(name);
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{host_multiarch}"))
            .args(defines)
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {clang} (apt-get install clang libbpf-dev): {e}"));
        assert!(status.success(), "{clang} failed to compile {} into {name}", source.display());
        // The loader needs the BTF sections (maps, CO-RE relocations), not DWARF: dropping the
        // debug sections keeps about 17 KB per object out of the shipped binary. Optional: an
        // unstripped object works the same.
        let strip = env::var("LLVM_STRIP").unwrap_or_else(|_| "llvm-strip".to_owned());
        let stripped = Command::new(&strip).arg("-g").arg(&object).status().is_ok_and(|s| s.success());
        if !stripped {
            println!("cargo:warning={strip} -g failed or is missing: {name} keeps its DWARF sections");
        }
    }
}
