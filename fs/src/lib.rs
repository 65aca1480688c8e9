//! pairfs filesystem: a POSIX filesystem on the pairfs volume (docs/DESIGN.md §2).
//!
//! - [`format`]: the on-disk structures (FORMAT.md §3);
//! - [`fs`]: the FS core, every POSIX operation as one volume transaction;
//! - [`fsck`]: the consistency checker;
//! - [`inspect`]: which blocks are in use, and what a block belongs to (`pairfs verify`);
//! - [`fuse`]: the thin FUSE adapter (fuser, multi-threaded).
//!
//! The internal modules: `btree` (directories and extent trees), `dir`, `extent`, `xattr`,
//! `alloc` (bitmaps, free-pending blocks), `tx` (staging one transaction), `siphash`.

mod alloc;
mod btree;
mod dir;
pub mod error;
mod extent;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod inspect;
pub mod replica;
mod siphash;
mod tx;
mod xattr;

pub use error::{FsError, FsResult};
pub use fs::{
    Attr, Ctx, DirItem, FormatOptions, Fs, FsHooks, FsMode, FsOptions, RenameFlags, SetAttr,
    StatFs, TimeSet,
};
