//! Embeds an rpath to the libtorch libraries that scripts/setup.sh installed, so the
//! binaries and tests run without LD_LIBRARY_PATH (a deployment can still point
//! LD_LIBRARY_PATH elsewhere, e.g. at a GPU machine's own torch/lib), and records
//! the absolute path of the default model for `--model`'s default.
fn main() {
    for var in ["TESSERA_TORCH_LIB", "TESSERA_DEFAULT_MODEL"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let absolute = |p: String| {
        std::fs::canonicalize(&p)
            .map(|p| p.display().to_string())
            .unwrap_or(p)
    };
    if let Ok(lib) = std::env::var("TESSERA_TORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", absolute(lib));
    }
    let model = std::env::var("TESSERA_DEFAULT_MODEL").unwrap_or_default();
    println!("cargo:rustc-env=TESSERA_BUILTIN_MODEL={}", absolute(model));
}
