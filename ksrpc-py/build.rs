//! Link against the libpython pyo3 was configured with, and record its
//! directory as an rpath, so the binary loads that one and not a different
//! `libpython3.x.so` that happens to be on the default library path. Also
//! remember that interpreter's path: an embedded interpreter cannot know its
//! own `sys.executable`, and SDKs start subprocesses with it.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    if let Some(exe) = pyo3_build_config::get().executable() {
        println!("cargo:rustc-env=KSRPC_BUILD_PYTHON={exe}");
    }
}
