//! `sqlx::migrate!` embeds the migration files at compile time; without this, adding a migration
//! would not rebuild the server, and a stale binary would run without it.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
