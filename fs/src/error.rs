//! `FsError`: every failure of the FS core, converted to an errno once, at the FUSE edge
//! (docs/DESIGN.md §10.2, after mountpoint-s3 `fs/error.rs`).

use pairfs::VolumeError;

/// Errors of the filesystem core.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such file or directory (ENOENT).
    #[error("no such file or directory")]
    NotFound,
    /// The name exists (EEXIST).
    #[error("file exists")]
    Exists,
    /// A directory was needed (ENOTDIR).
    #[error("not a directory")]
    NotDir,
    /// A non-directory was needed (EISDIR).
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty (ENOTEMPTY).
    #[error("directory not empty")]
    NotEmpty,
    /// The volume or the inode table is full (ENOSPC).
    #[error("no space left on the volume")]
    NoSpace,
    /// A name longer than 255 bytes, or a symlink target longer than 4095 (ENAMETOOLONG).
    #[error("name too long")]
    NameTooLong,
    /// Bad argument (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// No such extended attribute (ENODATA).
    #[error("no such attribute")]
    NoAttr,
    /// A buffer too small, or an attribute name too long (ERANGE).
    #[error("result out of range")]
    Range,
    /// An attribute value larger than the attribute block can hold (E2BIG).
    #[error("argument list too long")]
    TooBig,
    /// A file would exceed the maximum size (EFBIG).
    #[error("file too large")]
    FileTooLarge,
    /// Too many hard links (EMLINK).
    #[error("too many links")]
    TooManyLinks,
    /// Operation not supported (EOPNOTSUPP).
    #[error("operation not supported")]
    NotSupported,
    /// Operation not permitted (EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// An inode number that does not name a live inode (ESTALE).
    #[error("stale file handle")]
    Stale,
    /// The filesystem is read-only (EROFS).
    #[error("read-only filesystem")]
    ReadOnly,
    /// The volume cannot hold a filesystem with these parameters (EINVAL).
    #[error("cannot format: {0}")]
    BadFormat(String),
    /// The superblock is missing, corrupt or does not match the volume (EIO).
    #[error("bad superblock: {0}")]
    BadSuperblock(String),
    /// On-disk structures fail their checks (EIO, logged with the details).
    #[error("corrupt filesystem: {0}")]
    Corrupt(String),
    /// The node that runs the filesystem cannot take the change (EIO), and why: a
    /// primary that could not resolve whether its peer holds newer data, for instance.
    #[error("replication: {0}")]
    Replication(String),
    /// The volume failed (EIO; after an I/O error the volume refuses writes).
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl FsError {
    /// The errno this error is reported as.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::FileTooLarge => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::NotPermitted => libc::EPERM,
            FsError::Stale => libc::ESTALE,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadFormat(_) => libc::EINVAL,
            FsError::BadSuperblock(_) | FsError::Corrupt(_) | FsError::Replication(_) => libc::EIO,
            FsError::Volume(VolumeError::ReadOnly) => libc::EROFS,
            FsError::Volume(VolumeError::LocalUnreflectedFull { .. }) => libc::ENOSPC,
            FsError::Volume(_) => libc::EIO,
        }
    }

    /// A corruption error with context.
    pub fn corrupt(what: impl Into<String>) -> FsError {
        FsError::Corrupt(what.into())
    }
}

/// Result of FS operations.
pub type FsResult<T> = Result<T, FsError>;
