//! Embeds an rpath to the libtorch libraries that scripts/setup.sh installed, so the
//! binaries and tests run without LD_LIBRARY_PATH. A deployment can still override it
//! with LD_LIBRARY_PATH (for example to a GPU machine's own torch/lib).
fn main() {
    println!("cargo:rerun-if-env-changed=TESSERA_TORCH_LIB");
    if let Ok(lib) = std::env::var("TESSERA_TORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).map(|p| p.display().to_string()).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
