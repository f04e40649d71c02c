//! Link against the libpython pyo3 was configured with, and record its
//! directory as an rpath, so the binary loads that one and not a different
//! `libpython3.x.so` that happens to be on the default library path.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
