//! `embed_migrations!` reads `migrations/` at compile time; without this, a new migration
//! would not be compiled in until some source file of this crate changed.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
