//! Embeds an rpath to the libtorch libraries that scripts/setup.sh installed, so the
//! binaries and tests run without LD_LIBRARY_PATH (a deployment can still point
//! LD_LIBRARY_PATH elsewhere, e.g. at a GPU machine's own torch/lib), and records
//! the absolute path of the default model for `--model`'s default.
//!
//! With the `cuda` feature it also links `libtorch_cuda.so` from the real torch/lib
//! folder of the wheel (not the CPU-only link folder) with `--no-as-needed`: nothing in
//! the binary references its symbols, so without that flag the linker drops it, its CUDA
//! hooks never register and `Cuda::is_available()` is false. Build such a binary with
//! `scripts/build-cuda.sh` (a separate target dir, `LIBTORCH_LIB` pointed at the wheel).
fn main() {
    for var in ["TESSERA_TORCH_LIB", "TESSERA_DEFAULT_MODEL"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let absolute = |p: String| {
        std::fs::canonicalize(&p)
            .map(|p| p.display().to_string())
            .unwrap_or(p)
    };
    let torch_lib = std::env::var("TESSERA_TORCH_LIB").ok().map(absolute);
    if let Some(lib) = &torch_lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let lib = torch_lib
            .clone()
            .expect("the cuda feature needs TESSERA_TORCH_LIB (the wheel's torch/lib)");
        let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
        if !cuda.exists() {
            panic!(
                "the cuda feature needs {} (run scripts/setup.sh)",
                cuda.display()
            );
        }
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(torch_lib.as_deref());
    let model = std::env::var("TESSERA_DEFAULT_MODEL").unwrap_or_default();
    println!("cargo:rustc-env=TESSERA_BUILTIN_MODEL={}", absolute(model));
}

/// Compiles the C++ shim (`csrc/`) against the wheel's headers. It is built with OpenMP
/// and linked to the wheel's own `libgomp.so.1`, so that `at::parallel_for` runs on the
/// same thread pool as libtorch's operators.
fn build_shim(torch_lib: Option<&str>) {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH (set in .cargo/config.toml)");
    let include = std::path::Path::new(&libtorch).join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/parallel.cpp")
        .file("csrc/collectives.cpp")
        .file("csrc/packed_linear.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The wheel has no gloo headers: declarations of the types c10d names.
        .include("csrc/gloo_decl")
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None);
    // ProcessGroupNCCL needs nccl.h and the CUDA toolkit headers, which the torch wheel
    // lacks: with the cuda feature, TESSERA_NCCL_INCLUDE (folders separated by ':', e.g.
    // the nvidia-nccl and CUDA headers) turns it on; without it, several CUDA ranks are
    // refused with a clear error at startup.
    println!("cargo:rerun-if-env-changed=TESSERA_NCCL_INCLUDE");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Some(dirs) = std::env::var_os("TESSERA_NCCL_INCLUDE") {
            for dir in std::env::split_paths(&dirs) {
                build.include(dir);
            }
            build
                .define("USE_C10D_NCCL", None)
                .define("TESSERA_NCCL", None);
        }
    }
    build.compile("tessera_shim");
    let lib = torch_lib.expect("TESSERA_TORCH_LIB (the wheel's torch/lib, for libgomp)");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg={lib}/libgomp.so.1");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
