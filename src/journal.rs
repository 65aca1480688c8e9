//! The journal: the remote-unreflected area of docs/DESIGN.md §3 (JP 2003-402994
//! ¶0075–0077, JP 2003-418907 ¶0195–0233), byte layout in `docs/FORMAT.md` §2.
//!
//! One file holds two header slots and a circular log of *entries*. An entry is one atomic
//! transaction: a `Seq`, the host timestamp, and the blocks it writes, each with a CRC-32C;
//! a block's content is either in the entry (IMAGE) or was written straight into the normal
//! area before the entry (IN_PLACE: bulk file data is not written twice).
//!
//! The journal is the node's write-ahead log *and* its replication queue: entries stay
//! *retained* until the owner releases them (after the local checkpoint and, with a peer,
//! after the peer acknowledged them), so a replication pump can stream them in seq order
//! ([`Journal::retained`], [`Journal::read_entry`]).
//!
//! This module knows nothing of the normal area: [`crate::volume`] decides what goes into an
//! entry, replays entries and checkpoints.

use std::collections::VecDeque;

use crate::device::BlockDevice;
use crate::error::JournalError;
use crate::types::{
    BlockNo, Seq, VolumeId, crc32c, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64,
};

/// Size of one header slot; slots are at offsets 0 and `HEADER_SLOT`.
pub const HEADER_SLOT: usize = 512;
/// Size of the fixed part of an entry header.
pub const ENTRY_HEADER_LEN: usize = 128;
/// Size of one block descriptor.
pub const DESCRIPTOR_LEN: usize = 16;
/// Seqs are reserved in the header in steps of this many, so that a crash can never cause
/// a seq to be issued twice while costing one extra header write per million entries.
pub const SEQ_RESERVE_STEP: u64 = 1 << 20;

/// Entry flag (header offset 6, FORMAT.md §2.2): the entry's IN_PLACE data was written
/// to the normal area but not necessarily made durable before the entry itself was
/// written; recovery checks that data before it trusts the entry (FORMAT.md §2.3).
pub const FLAG_DATA_UNSYNCED: u16 = 1;
/// Entry flag: a transaction in the entry freed blocks (a replica makes the entry durable
/// before it writes a block in place that was free before it, FORMAT.md §2.4).
pub const FLAG_FREES: u16 = 2;
/// Every flag this version knows.
const KNOWN_FLAGS: u16 = FLAG_DATA_UNSYNCED | FLAG_FREES;

const HEADER_MAGIC: &[u8; 8] = b"PAIRFSJ\0";
const ENTRY_MAGIC: u32 = 0x454A_4650;
const VERSION: u32 = 1;
/// The forward search for a proof of corruption reads the journal in chunks of this size
/// (large sequential reads; the search only runs after an unclean close).
const SCAN_CHUNK: u64 = 8 << 20;

/// The journal header (one slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Incremented at every header write; the higher valid slot wins.
    pub generation: u64,
    /// The volume this journal belongs to.
    pub volume_id: VolumeId,
    /// Block size of the volume and alignment of entries.
    pub block_size: u32,
    /// Journal file length in bytes.
    pub capacity: u64,
    /// Size of the normal area in blocks.
    pub normal_blocks: u64,
    /// Incremented at every open; stamped into entries.
    pub mount_gen: u64,
    /// Offset of the oldest retained entry.
    pub tail_offset: u64,
    /// Seq of the entry just before the tail.
    pub tail_prev_seq: Seq,
    /// Every entry with a seq up to this one is applied to the normal area.
    pub checkpoint_seq: Seq,
    /// Every seq below this one may have been issued.
    pub seq_reserved: Seq,
    /// Written by a clean close: nothing lies beyond the end of the log.
    pub clean: bool,
}

impl JournalHeader {
    /// Encodes into one slot.
    pub fn encode(&self) -> [u8; HEADER_SLOT] {
        let mut b = [0u8; HEADER_SLOT];
        b[0..8].copy_from_slice(HEADER_MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, self.block_size);
        put_u64(&mut b, 16, self.generation);
        b[24..40].copy_from_slice(&self.volume_id.0);
        put_u64(&mut b, 40, self.capacity);
        put_u64(&mut b, 48, self.normal_blocks);
        put_u64(&mut b, 56, self.mount_gen);
        put_u64(&mut b, 64, self.tail_offset);
        put_u64(&mut b, 72, self.tail_prev_seq.0);
        put_u64(&mut b, 80, self.checkpoint_seq.0);
        put_u64(&mut b, 88, self.seq_reserved.0);
        put_u32(&mut b, 96, u32::from(self.clean));
        let crc = crc32c(&b[..508]);
        put_u32(&mut b, 508, crc);
        b
    }

    /// Decodes one slot, checking magic, version and checksum.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_SLOT {
            return Err("short header".into());
        }
        if &b[0..8] != HEADER_MAGIC {
            return Err("bad magic".into());
        }
        if crc32c(&b[..508]) != get_u32(b, 508) {
            return Err("checksum mismatch".into());
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[24..40]);
        Ok(Self {
            block_size: get_u32(b, 12),
            generation: get_u64(b, 16),
            volume_id: VolumeId(id),
            capacity: get_u64(b, 40),
            normal_blocks: get_u64(b, 48),
            mount_gen: get_u64(b, 56),
            tail_offset: get_u64(b, 64),
            tail_prev_seq: Seq(get_u64(b, 72)),
            checkpoint_seq: Seq(get_u64(b, 80)),
            seq_reserved: Seq(get_u64(b, 88)),
            clean: get_u32(b, 96) == 1,
        })
    }

    fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }
}

/// How a block's new content travels in an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorKind {
    /// The content is in the entry.
    Image,
    /// The content was written into the normal area before the entry.
    InPlace,
    /// As `InPlace`, and the block was free before the entry: a replica may also write
    /// it in place ahead of applying the entry without changing any visible state.
    InPlaceFresh,
}

/// One block of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Normal-area block number.
    pub block: BlockNo,
    /// Where the content is.
    pub kind: DescriptorKind,
    /// CRC-32C of the block's new content.
    pub crc: u32,
}

/// A block to put in a new entry.
#[derive(Clone, Copy, Debug)]
pub enum EntryBlock<'a> {
    /// Content carried in the entry.
    Image(&'a [u8]),
    /// Content already in the normal area, with its checksum.
    InPlace(u32),
    /// As `InPlace`, for a block that was free before the entry.
    InPlaceFresh(u32),
}

/// A decoded entry: its header fields and descriptors (not the images).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    /// The entry's seq.
    pub seq: Seq,
    /// Seq of the previous entry.
    pub prev_seq: Seq,
    /// Host time of the newest transaction in it (ns since the epoch).
    pub timestamp_ns: u64,
    /// Session that wrote it.
    pub mount_gen: u64,
    /// Number of FS transactions merged into it.
    pub n_tx: u32,
    /// Newest seq known durable when it was written.
    pub durable_seq: Seq,
    /// Its flags ([`FLAG_DATA_UNSYNCED`]).
    pub flags: u16,
    /// Byte offset in the journal file.
    pub offset: u64,
    /// Length in bytes (multiple of the block size).
    pub total_len: u64,
    /// Its blocks.
    pub descriptors: Vec<Descriptor>,
}

impl EntryInfo {
    /// Byte offset (from the entry start) of the first image.
    fn images_start(n_blocks: usize, bs: u64) -> u64 {
        align_up((ENTRY_HEADER_LEN + DESCRIPTOR_LEN * n_blocks) as u64, bs)
    }
}

/// The IMAGE contents of an entry in descriptor order (`None` for IN_PLACE blocks).
pub type Images = Vec<Option<Vec<u8>>>;

/// Where a retained entry is (the in-memory index of the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLoc {
    /// The entry's seq.
    pub seq: Seq,
    /// Seq of the previous entry.
    pub prev_seq: Seq,
    /// Byte offset in the journal file.
    pub offset: u64,
    /// Length in bytes.
    pub total_len: u64,
    /// Host time of the entry.
    pub timestamp_ns: u64,
    /// Number of blocks it writes.
    pub n_blocks: u32,
}

/// Fields of a new entry that the caller chooses.
#[derive(Clone, Copy, Debug)]
pub struct NewEntry<'a> {
    /// The seq to give it: `None` takes the next one; a secondary passes the primary's seq
    /// (it must be above every seq in the journal).
    pub seq: Option<Seq>,
    /// Host time of the newest transaction in it.
    pub timestamp_ns: u64,
    /// Number of FS transactions merged into it.
    pub n_tx: u32,
    /// Its flags ([`FLAG_DATA_UNSYNCED`]).
    pub flags: u16,
    /// Its blocks, each block at most once.
    pub blocks: &'a [(BlockNo, EntryBlock<'a>)],
}

/// The journal; see the module documentation.
pub struct Journal {
    dev: Box<dyn BlockDevice>,
    hdr: JournalHeader,
    /// Which slot the next header write goes to.
    next_slot: u64,
    /// Offset where the next entry is placed (before a possible wrap).
    head: u64,
    retained: VecDeque<EntryLoc>,
    /// Seq of the newest entry appended (`Seq::NONE` if none ever).
    last_seq: Seq,
    /// Seq of the newest entry whose bytes, and every older entry's, are written: below
    /// `last_seq` while entries prepared by [`Journal::prepare_entry`] await their write.
    /// A sync makes this one durable, not `last_seq`.
    written_seq: Seq,
    /// Newest seq known durable.
    durable_seq: Seq,
    /// The seq the next entry gets.
    next: Seq,
    /// Entries were written since the last sync.
    unsynced: bool,
    /// Writes so far (a mark for [`Journal::synced_ahead`]).
    writes: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("hdr", &self.hdr)
            .field("head", &self.head)
            .field("retained", &self.retained.len())
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

/// What the journal must match at open.
#[derive(Clone, Copy, Debug)]
pub struct JournalExpect {
    /// Block size of the volume.
    pub block_size: u32,
    /// Size of the normal area in blocks.
    pub normal_blocks: u64,
}

pub(crate) fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Journal {
    /// Smallest journal: the header block and room for a few entries.
    pub fn min_capacity(block_size: u32) -> u64 {
        u64::from(block_size) * 16
    }

    /// Writes a fresh, empty journal on `dev` (both header slots).
    pub fn format(
        dev: &dyn BlockDevice,
        volume_id: VolumeId,
        block_size: u32,
        normal_blocks: u64,
    ) -> Result<(), JournalError> {
        let capacity = dev.len().map_err(JournalError::io("sizing the journal"))?;
        let bs = u64::from(block_size);
        if capacity % bs != 0 || capacity < Self::min_capacity(block_size) {
            return Err(JournalError::Mismatch(format!(
                "journal length {capacity} is not a multiple of the block size {bs} of at least {}",
                Self::min_capacity(block_size)
            )));
        }
        let hdr = JournalHeader {
            generation: 1,
            volume_id,
            block_size,
            capacity,
            normal_blocks,
            mount_gen: 0,
            tail_offset: bs,
            tail_prev_seq: Seq::NONE,
            checkpoint_seq: Seq::NONE,
            seq_reserved: Seq(1),
            clean: true,
        };
        // Invalidate whatever was at the first entry position (a reused file).
        dev.write_at(&vec![0u8; bs as usize], bs)
            .map_err(JournalError::io("formatting the journal"))?;
        dev.write_at(&hdr.encode(), 0)
            .map_err(JournalError::io("writing the journal header"))?;
        let mut second = hdr.clone();
        second.generation = 0;
        dev.write_at(&second.encode(), HEADER_SLOT as u64)
            .map_err(JournalError::io("writing the journal header"))?;
        dev.sync().map_err(JournalError::io("syncing the journal"))
    }

    /// Reads the header of `dev` without opening it (for `fsck` and diagnostics).
    pub fn read_header(dev: &dyn BlockDevice) -> Result<(JournalHeader, u64), JournalError> {
        let mut slots = [0u8; 2 * HEADER_SLOT];
        dev.read_at(&mut slots, 0)
            .map_err(JournalError::io("reading the journal header"))?;
        let a = JournalHeader::decode(&slots[..HEADER_SLOT]);
        let b = JournalHeader::decode(&slots[HEADER_SLOT..]);
        match (a, b) {
            (Ok(a), Ok(b)) if b.generation > a.generation => Ok((b, 0)),
            (Ok(a), _) => Ok((a, 1)),
            (Err(_), Ok(b)) => Ok((b, 0)),
            (Err(ea), Err(eb)) => Err(JournalError::BadHeader(format!(
                "slot 0: {ea}; slot 1: {eb}"
            ))),
        }
    }

    /// Opens the journal, scans the log from the tail and returns every valid entry.
    /// Nothing is written: call [`Journal::begin_session`] before appending.
    pub fn open(
        dev: Box<dyn BlockDevice>,
        expect: JournalExpect,
    ) -> Result<(Journal, Vec<EntryInfo>), JournalError> {
        let (hdr, next_slot) = Self::read_header(&*dev)?;
        let len = dev.len().map_err(JournalError::io("sizing the journal"))?;
        let bs = hdr.bs();
        if hdr.block_size != expect.block_size {
            return Err(JournalError::Mismatch(format!(
                "journal block size {} but volume block size {}",
                hdr.block_size, expect.block_size
            )));
        }
        if hdr.normal_blocks != expect.normal_blocks {
            return Err(JournalError::Mismatch(format!(
                "journal is for a volume of {} blocks, this one has {}",
                hdr.normal_blocks, expect.normal_blocks
            )));
        }
        if hdr.capacity != len
            || hdr.capacity < Self::min_capacity(hdr.block_size)
            || hdr.capacity % bs != 0
        {
            return Err(JournalError::Mismatch(format!(
                "journal header says {} bytes, file has {len}",
                hdr.capacity
            )));
        }
        if hdr.tail_offset < bs || hdr.tail_offset > hdr.capacity || hdr.tail_offset % bs != 0 {
            return Err(JournalError::BadHeader(format!(
                "tail offset {} out of range",
                hdr.tail_offset
            )));
        }
        let mut j = Journal {
            dev,
            head: hdr.tail_offset,
            last_seq: hdr.tail_prev_seq,
            written_seq: hdr.tail_prev_seq,
            durable_seq: hdr.tail_prev_seq,
            next: Seq::NONE,
            hdr,
            next_slot,
            retained: VecDeque::new(),
            unsynced: false,
            writes: 0,
        };
        let entries = j.scan()?;
        for e in &entries {
            j.retained.push_back(EntryLoc {
                seq: e.seq,
                prev_seq: e.prev_seq,
                offset: e.offset,
                total_len: e.total_len,
                timestamp_ns: e.timestamp_ns,
                n_blocks: e.descriptors.len() as u32,
            });
        }
        if let Some(last) = entries.last() {
            j.head = last.offset + last.total_len;
            j.last_seq = last.seq;
            j.written_seq = last.seq;
            j.durable_seq = last.seq;
        }
        // After a crash `seq_reserved` is above anything that may have been issued; after a
        // clean close it is exactly the next seq.
        j.next = j.last_seq.next().max(j.hdr.seq_reserved);
        Ok((j, entries))
    }

    /// Walks the chain of valid entries from the tail (FORMAT.md §2.3).
    fn scan(&self) -> Result<Vec<EntryInfo>, JournalError> {
        let bs = self.hdr.bs();
        let mut out: Vec<EntryInfo> = Vec::new();
        let mut pos = self.hdr.tail_offset;
        let mut prev = self.hdr.tail_prev_seq;
        let mut min_gen = 0u64;
        let first_failure = loop {
            match self.try_entry(pos, prev, min_gen) {
                Ok(e) => {
                    pos = e.offset + e.total_len;
                    prev = e.seq;
                    min_gen = e.mount_gen;
                    out.push(e);
                    continue;
                }
                Err(reason) if pos != bs => match self.try_entry(bs, prev, min_gen) {
                    Ok(e) => {
                        pos = e.offset + e.total_len;
                        prev = e.seq;
                        min_gen = e.mount_gen;
                        out.push(e);
                        continue;
                    }
                    Err(_) => break reason,
                },
                Err(reason) => break reason,
            }
        };
        if !self.hdr.clean {
            self.check_no_durable_successor(prev, &first_failure)?;
            if first_failure != "empty" {
                tracing::warn!(
                    after = %prev,
                    reason = %first_failure,
                    "journal ends with an incomplete entry (torn write before a crash); dropped"
                );
            }
        }
        Ok(out)
    }

    /// After an unclean close: fails if some entry proves that an entry after `last` was
    /// durable (so the end of the chain is corruption, not a torn write).
    pub(crate) fn check_no_durable_successor(
        &self,
        last: Seq,
        reason: &str,
    ) -> Result<(), JournalError> {
        let bs = self.hdr.bs();
        let cap = self.hdr.capacity;
        let mut off = bs;
        let mut buf = Vec::new();
        while off < cap {
            let n = SCAN_CHUNK.min(cap - off);
            buf.resize(n as usize, 0);
            self.dev
                .read_at(&mut buf, off)
                .map_err(JournalError::io("scanning the journal"))?;
            for i in (0..n).step_by(bs as usize) {
                let h = &buf[i as usize..(i as usize + ENTRY_HEADER_LEN)];
                if let Ok(raw) = self.parse_header(h) {
                    if raw.seq > last && raw.durable_seq > last {
                        return Err(JournalError::Corrupt {
                            after: last,
                            reason: reason.to_string(),
                            proof: raw.seq,
                            durable: raw.durable_seq,
                        });
                    }
                }
            }
            off += n;
        }
        Ok(())
    }

    /// Checks the fixed part of an entry header (magic, version, checksum, volume).
    fn parse_header(&self, h: &[u8]) -> Result<RawHeader, String> {
        if get_u32(h, 0) != ENTRY_MAGIC {
            return Err("empty".into());
        }
        if crc32c(&h[..124]) != get_u32(h, 124) {
            return Err("entry header checksum mismatch".into());
        }
        if get_u16(h, 4) != VERSION as u16 {
            return Err(format!("unsupported entry version {}", get_u16(h, 4)));
        }
        if h[40..56] != self.hdr.volume_id.0 {
            return Err("entry of another volume".into());
        }
        Ok(RawHeader {
            flags: get_u16(h, 6),
            seq: Seq(get_u64(h, 8)),
            prev_seq: Seq(get_u64(h, 16)),
            timestamp_ns: get_u64(h, 24),
            mount_gen: get_u64(h, 32),
            n_blocks: get_u32(h, 56),
            n_tx: get_u32(h, 60),
            total_len: get_u64(h, 64),
            descr_crc: get_u32(h, 72),
            durable_seq: Seq(get_u64(h, 76)),
        })
    }

    /// Reads and fully validates the entry at `pos` that must follow `prev`.
    fn try_entry(&self, pos: u64, prev: Seq, min_gen: u64) -> Result<EntryInfo, String> {
        self.try_entry_buf(pos, prev, min_gen).map(|(e, _)| e)
    }

    /// As `try_entry`, also returning the whole entry as read (header, descriptors, images).
    fn try_entry_buf(
        &self,
        pos: u64,
        prev: Seq,
        min_gen: u64,
    ) -> Result<(EntryInfo, Vec<u8>), String> {
        let bs = self.hdr.bs();
        let cap = self.hdr.capacity;
        if pos + bs > cap {
            return Err("end of file".into());
        }
        let mut first = vec![0u8; bs as usize];
        self.dev
            .read_at(&mut first, pos)
            .map_err(|e| format!("read error: {e}"))?;
        let raw = self.parse_header(&first[..ENTRY_HEADER_LEN])?;
        if raw.prev_seq != prev || raw.seq <= prev {
            return Err("not the successor".into());
        }
        if raw.mount_gen < min_gen || raw.mount_gen > self.hdr.mount_gen {
            return Err("stale entry".into());
        }
        if raw.flags & !KNOWN_FLAGS != 0 {
            return Err(format!("unknown entry flags {:#x}", raw.flags));
        }
        let n = raw.n_blocks as u64;
        // Bound before multiplying: a block can appear at most once per entry.
        if n > self.hdr.normal_blocks || n > cap / DESCRIPTOR_LEN as u64 {
            return Err("impossible block count".into());
        }
        let images_start = EntryInfo::images_start(n as usize, bs);
        if raw.total_len < images_start || raw.total_len % bs != 0 || raw.total_len > cap - pos {
            return Err("impossible entry length".into());
        }
        let mut buf = vec![0u8; raw.total_len as usize];
        buf[..bs as usize].copy_from_slice(&first);
        if raw.total_len > bs {
            self.dev
                .read_at(&mut buf[bs as usize..], pos + bs)
                .map_err(|e| format!("read error: {e}"))?;
        }
        let dend = ENTRY_HEADER_LEN + DESCRIPTOR_LEN * n as usize;
        if crc32c(&buf[ENTRY_HEADER_LEN..dend]) != raw.descr_crc {
            return Err("descriptor checksum mismatch".into());
        }
        let mut descriptors: Vec<Descriptor> = Vec::with_capacity(n as usize);
        let mut images = 0u64;
        for i in 0..n as usize {
            let d = &buf[ENTRY_HEADER_LEN + i * DESCRIPTOR_LEN..][..DESCRIPTOR_LEN];
            let block = get_u64(d, 0);
            if block >= self.hdr.normal_blocks {
                return Err(format!("block {block} outside the volume"));
            }
            // Descriptors are in block order, each block once (FORMAT.md §2.2).
            if descriptors.last().is_some_and(|p| p.block >= block) {
                return Err(format!("block {block} out of order or named twice"));
            }
            let kind = match d[8] {
                1 => DescriptorKind::Image,
                2 => DescriptorKind::InPlace,
                3 => DescriptorKind::InPlaceFresh,
                k => return Err(format!("unknown descriptor kind {k}")),
            };
            if kind == DescriptorKind::Image {
                images += 1;
            }
            descriptors.push(Descriptor {
                block,
                kind,
                crc: get_u32(d, 12),
            });
        }
        if raw.total_len != images_start + images * bs {
            return Err("entry length does not match its images".into());
        }
        let mut at = images_start as usize;
        for d in &descriptors {
            if d.kind == DescriptorKind::Image {
                if crc32c(&buf[at..at + bs as usize]) != d.crc {
                    return Err(format!("image of block {} fails its checksum", d.block));
                }
                at += bs as usize;
            }
        }
        let info = EntryInfo {
            seq: raw.seq,
            prev_seq: raw.prev_seq,
            timestamp_ns: raw.timestamp_ns,
            mount_gen: raw.mount_gen,
            n_tx: raw.n_tx,
            durable_seq: raw.durable_seq,
            flags: raw.flags,
            offset: pos,
            total_len: raw.total_len,
            descriptors,
        };
        Ok((info, buf))
    }

    /// Starts a writing session: a new `mount_gen`, `clean` cleared, the seq reservation
    /// raised past anything a crash may have issued. Durable on return.
    pub fn begin_session(&mut self) -> Result<(), JournalError> {
        let next = self.next_seq();
        self.update_header(|h| {
            h.mount_gen += 1;
            h.clean = false;
            h.seq_reserved = Seq(next.0 + SEQ_RESERVE_STEP);
        })?;
        Ok(())
    }

    /// The seq the next entry will get.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// The current header.
    pub fn header(&self) -> &JournalHeader {
        &self.hdr
    }

    /// Seq of the newest entry written.
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// Newest seq known durable.
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }

    /// Retained entries, oldest first.
    pub fn retained(&self) -> &VecDeque<EntryLoc> {
        &self.retained
    }

    /// Retained entries with `after < seq <= upto`, oldest first, found by bisection (a
    /// sync-mode primary asks after every entry, with thousands retained).
    pub fn retained_between(&self, after: Seq, upto: Seq) -> impl Iterator<Item = &EntryLoc> {
        let first = self.retained.partition_point(|e| e.seq <= after);
        self.retained
            .range(first..)
            .take_while(move |e| e.seq <= upto)
    }

    /// Bytes of the log in use by retained entries (including wrap waste).
    pub fn used_bytes(&self) -> u64 {
        self.capacity_for_entries() - self.free_bytes()
    }

    /// Bytes available to entries in total.
    pub fn capacity_for_entries(&self) -> u64 {
        self.hdr.capacity - self.hdr.bs()
    }

    /// Free bytes (an entry of this size may still not fit at the head: see `place`).
    pub fn free_bytes(&self) -> u64 {
        let bs = self.hdr.bs();
        let cap = self.hdr.capacity;
        match self.retained.front() {
            None => cap - bs,
            Some(t) if self.head > t.offset => (cap - self.head) + (t.offset - bs),
            Some(t) => t.offset.saturating_sub(self.head),
        }
    }

    /// Whether an entry of `len` bytes fits now: contiguous room, at the head or after
    /// the ring's wrap ([`Journal::free_bytes`] counts both parts together).
    pub fn fits(&self, len: u64) -> bool {
        self.place(len).is_ok()
    }

    /// The offset where an entry of `len` bytes goes, if it fits.
    fn place(&self, len: u64) -> Result<u64, JournalError> {
        let bs = self.hdr.bs();
        let cap = self.hdr.capacity;
        if len > cap - bs {
            return Err(JournalError::TooLarge {
                needed: len,
                capacity: cap - bs,
            });
        }
        let fits_at_head = self.head + len <= cap;
        match self.retained.front() {
            None if fits_at_head => Ok(self.head),
            None => Ok(bs),
            Some(t) if self.head > t.offset => {
                if fits_at_head {
                    Ok(self.head)
                } else if bs + len <= t.offset {
                    Ok(bs)
                } else {
                    Err(self.full(len))
                }
            }
            Some(t) if self.head + len <= t.offset => Ok(self.head),
            Some(_) => Err(self.full(len)),
        }
    }

    fn full(&self, len: u64) -> JournalError {
        JournalError::Full {
            needed: len,
            free: self.free_bytes(),
        }
    }

    /// Size in bytes of an entry with these blocks.
    pub fn entry_len(&self, n_blocks: usize, n_images: usize) -> u64 {
        let bs = self.hdr.bs();
        EntryInfo::images_start(n_blocks, bs) + n_images as u64 * bs
    }

    /// Writes a new entry at the head (not yet durable: see [`Journal::sync`]). Returns its
    /// location. Fails with `Full` when retained entries leave no room.
    pub fn append(&mut self, e: &NewEntry<'_>) -> Result<EntryLoc, JournalError> {
        self.append_unindexed(e).map(|(loc, _)| loc)
    }

    /// [`Journal::append`], also returning what [`Journal::read_entry`] would read back
    /// (a caller that indexes the entry's blocks need not read megabytes back).
    pub fn append_with_info(
        &mut self,
        e: &NewEntry<'_>,
    ) -> Result<(EntryLoc, EntryInfo), JournalError> {
        let before = self.placement();
        let (info, head) = self.prepare_entry(e)?;
        let loc = *self.retained.back().expect("the entry just placed");
        self.write_placed(e, &head, &loc, before)?;
        Ok((loc, info))
    }

    /// Writes the entry; returns where, and its descriptors.
    fn append_unindexed(
        &mut self,
        e: &NewEntry<'_>,
    ) -> Result<(EntryLoc, Vec<Descriptor>), JournalError> {
        let before = self.placement();
        let (loc, descriptors, head) = self.place_entry(e)?;
        self.write_placed(e, &head, &loc, before)?;
        Ok((loc, descriptors))
    }

    /// Where the next entry would be placed from: the head and the seqs.
    fn placement(&self) -> (u64, Seq, Seq) {
        (self.head, self.last_seq, self.next)
    }

    /// Writes the entry [`Journal::place_entry`] placed last; if the write fails, the
    /// journal forgets the entry again, back to `before` ([`Journal::placement`]).
    fn write_placed(
        &mut self,
        e: &NewEntry<'_>,
        head: &[u8],
        loc: &EntryLoc,
        before: (u64, Seq, Seq),
    ) -> Result<(), JournalError> {
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(e.blocks.len() + 1);
        bufs.push(head);
        bufs.extend(e.blocks.iter().filter_map(|(_, b)| match b {
            EntryBlock::Image(d) => Some(*d),
            _ => None,
        }));
        if let Err(err) = self.dev.write_vectored_at(&bufs, loc.offset) {
            self.retained.pop_back();
            (self.head, self.last_seq, self.next) = before;
            return Err(JournalError::io("writing a journal entry")(err));
        }
        self.entry_written(loc.seq);
        Ok(())
    }

    /// Places the entry at the head as [`Journal::append`] does, without writing it:
    /// returns what [`Journal::read_entry`] will read back, and the entry's header and
    /// descriptor bytes. The caller writes those at the entry's offset followed by its
    /// images (in the blocks' order), then reports with [`Journal::entry_written`], in the
    /// order the entries were prepared. Until then a sync does not make the entry durable,
    /// and a read of it returns what the device held before.
    pub fn prepare_entry(
        &mut self,
        e: &NewEntry<'_>,
    ) -> Result<(EntryInfo, Vec<u8>), JournalError> {
        let durable_seq = self.durable_seq;
        let (loc, descriptors, head) = self.place_entry(e)?;
        let info = EntryInfo {
            seq: loc.seq,
            prev_seq: loc.prev_seq,
            timestamp_ns: e.timestamp_ns,
            mount_gen: self.hdr.mount_gen,
            n_tx: e.n_tx,
            durable_seq,
            flags: e.flags,
            offset: loc.offset,
            total_len: loc.total_len,
            descriptors,
        };
        Ok((info, head))
    }

    /// Places the entry at the head: its location, descriptors, and header bytes.
    fn place_entry(
        &mut self,
        e: &NewEntry<'_>,
    ) -> Result<(EntryLoc, Vec<Descriptor>, Vec<u8>), JournalError> {
        let bs = self.hdr.bs();
        let n_images = e
            .blocks
            .iter()
            .filter(|(_, b)| matches!(b, EntryBlock::Image(_)))
            .count();
        let total_len = self.entry_len(e.blocks.len(), n_images);
        let seq = match e.seq {
            None => self.next_seq(),
            Some(s) if s > self.last_seq => s,
            Some(s) => {
                return Err(JournalError::SeqOrder {
                    seq: s,
                    last: self.last_seq,
                });
            }
        };
        if self.needs_reservation(seq) {
            // The caller reserves first (`reserve`): that header write syncs the journal,
            // which the volume must precede with a sync of the normal area.
            return Err(JournalError::NotReserved { seq });
        }
        if e.blocks.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(JournalError::BadEntry {
                seq,
                offset: self.head,
                reason: "blocks not in strictly increasing order".into(),
            });
        }
        if e.blocks
            .iter()
            .any(|(_, b)| matches!(b, EntryBlock::Image(d) if d.len() as u64 != bs))
        {
            return Err(JournalError::BadEntry {
                seq,
                offset: self.head,
                reason: format!("an image is not one block of {bs} bytes"),
            });
        }
        let offset = self.place(total_len)?;
        let prev_seq = self.last_seq;
        // The header and descriptors in one buffer; the images are written from where they
        // are (one vectored write: no copy of megabytes into an entry buffer first).
        let images_start = EntryInfo::images_start(e.blocks.len(), bs) as usize;
        let mut buf = vec![0u8; images_start];
        let mut descriptors = Vec::with_capacity(e.blocks.len());
        for (i, (block, b)) in e.blocks.iter().enumerate() {
            let d = &mut buf[ENTRY_HEADER_LEN + i * DESCRIPTOR_LEN..][..DESCRIPTOR_LEN];
            put_u64(d, 0, *block);
            let (kind, crc) = match b {
                EntryBlock::Image(data) => {
                    d[8] = 1;
                    (DescriptorKind::Image, crc32c(data))
                }
                EntryBlock::InPlace(crc) => {
                    d[8] = 2;
                    (DescriptorKind::InPlace, *crc)
                }
                EntryBlock::InPlaceFresh(crc) => {
                    d[8] = 3;
                    (DescriptorKind::InPlaceFresh, *crc)
                }
            };
            put_u32(d, 12, crc);
            descriptors.push(Descriptor {
                block: *block,
                kind,
                crc,
            });
        }
        let dend = ENTRY_HEADER_LEN + DESCRIPTOR_LEN * e.blocks.len();
        let descr_crc = crc32c(&buf[ENTRY_HEADER_LEN..dend]);
        let h = &mut buf[..ENTRY_HEADER_LEN];
        put_u32(h, 0, ENTRY_MAGIC);
        put_u16(h, 4, VERSION as u16);
        put_u16(h, 6, e.flags);
        put_u64(h, 8, seq.0);
        put_u64(h, 16, prev_seq.0);
        put_u64(h, 24, e.timestamp_ns);
        put_u64(h, 32, self.hdr.mount_gen);
        h[40..56].copy_from_slice(&self.hdr.volume_id.0);
        put_u32(h, 56, e.blocks.len() as u32);
        put_u32(h, 60, e.n_tx);
        put_u64(h, 64, total_len);
        put_u32(h, 72, descr_crc);
        put_u64(h, 76, self.durable_seq.0);
        let crc = crc32c(&h[..124]);
        put_u32(h, 124, crc);
        let loc = EntryLoc {
            seq,
            prev_seq,
            offset,
            total_len,
            timestamp_ns: e.timestamp_ns,
            n_blocks: e.blocks.len() as u32,
        };
        self.retained.push_back(loc);
        self.head = offset + total_len;
        self.last_seq = seq;
        self.next = self.next.max(seq.next());
        Ok((loc, descriptors, buf))
    }

    /// The entry `seq` prepared by [`Journal::prepare_entry`] is written, and so is every
    /// entry before it: the next sync makes them durable.
    pub fn entry_written(&mut self, seq: Seq) {
        debug_assert!(seq > self.written_seq && seq <= self.last_seq);
        self.written_seq = seq;
        self.unsynced = true;
        self.writes += 1;
    }

    /// Whether an entry with this seq (`None`: the next one) needs [`Journal::reserve`]
    /// first: seqs are issued only below the header's durable reservation.
    pub fn needs_reservation(&self, seq: impl Into<Option<Seq>>) -> bool {
        seq.into().unwrap_or(self.next) >= self.hdr.seq_reserved
    }

    /// Raises the seq reservation past `seq` (`None`: the next one), durably: a header
    /// write and a sync of the journal, which also makes every entry written so far
    /// durable.
    pub fn reserve(&mut self, seq: impl Into<Option<Seq>>) -> Result<(), JournalError> {
        let seq = seq.into().unwrap_or(self.next);
        let reserve = Seq(seq.0 + SEQ_RESERVE_STEP);
        self.update_header(|h| h.seq_reserved = h.seq_reserved.max(reserve))
    }

    /// Makes every written entry durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.unsynced {
            self.dev
                .sync()
                .map_err(JournalError::io("syncing the journal"))?;
            self.unsynced = false;
        }
        self.durable_seq = self.written_seq;
        Ok(())
    }

    /// A mark of the writes so far, if some are not durable: for a caller that syncs the
    /// device without its lock (`Volume::flush_ahead`) and then hands the mark back to
    /// [`Journal::synced_ahead`].
    pub fn unsynced_mark(&self) -> Option<u64> {
        self.unsynced.then_some(self.writes)
    }

    /// The count of writes so far, unsynced or not ([`Journal::unsynced_mark`]'s unit).
    pub fn write_mark(&self) -> u64 {
        self.writes
    }

    /// The device was synced after the writes up to `mark` (without the caller's lock):
    /// if nothing was written since, the next [`Journal::sync`] need not sync it again
    /// (it still moves the durable seq). Making written entries durable early is always
    /// allowed: the ordering rules are about what is durable before something is written.
    pub fn synced_ahead(&mut self, mark: u64) {
        if mark == self.writes {
            self.unsynced = false;
        }
    }

    /// Writes a new header (alternating slots) after applying `f`, and syncs: the header
    /// and every entry written before it are durable on return.
    pub fn update_header(
        &mut self,
        f: impl FnOnce(&mut JournalHeader),
    ) -> Result<(), JournalError> {
        let mut h = self.hdr.clone();
        f(&mut h);
        h.generation += 1;
        self.dev
            .write_at(&h.encode(), self.next_slot * HEADER_SLOT as u64)
            .map_err(JournalError::io("writing the journal header"))?;
        self.dev
            .sync()
            .map_err(JournalError::io("syncing the journal header"))?;
        self.unsynced = false;
        self.durable_seq = self.written_seq;
        self.hdr = h;
        self.next_slot ^= 1;
        Ok(())
    }

    /// Recovery found that `entries[keep]` (and so every entry after it) was never durable
    /// although it scanned as valid (FORMAT.md §2.3, data written in place lost): forgets
    /// them, so that the next entry follows `entries[keep - 1]`, and with `invalidate`
    /// overwrites the first block of `entries[keep]` with zeros, so that no later scan can
    /// take it for a successor again (durable with the next header write).
    pub(crate) fn drop_tail(
        &mut self,
        entries: &[EntryInfo],
        keep: usize,
        invalidate: bool,
    ) -> Result<(), JournalError> {
        let Some(first) = entries.get(keep) else {
            return Ok(());
        };
        while self.retained.back().is_some_and(|e| e.seq >= first.seq) {
            self.retained.pop_back();
        }
        match keep.checked_sub(1).and_then(|i| entries.get(i)) {
            Some(p) => {
                self.head = p.offset + p.total_len;
                self.last_seq = p.seq;
            }
            None => {
                self.head = self.hdr.tail_offset;
                self.last_seq = self.hdr.tail_prev_seq;
            }
        }
        self.written_seq = self.last_seq;
        self.durable_seq = self.last_seq;
        if invalidate {
            self.dev
                .write_at(&vec![0u8; self.hdr.bs() as usize], first.offset)
                .map_err(JournalError::io("invalidating a lost journal entry"))?;
            self.unsynced = true;
            self.writes += 1;
        }
        Ok(())
    }

    /// Empties the log and makes the next entry follow `prev`, a seq of another log (the
    /// local-unreflected area starting after a freeze point, FORMAT.md §5.1). Requires no
    /// retained entry and `prev` at or above every seq written here, so that no old entry
    /// can continue the new chain. Durable on return.
    pub fn restart_after(&mut self, prev: Seq) -> Result<(), JournalError> {
        if !self.retained.is_empty() || prev < self.last_seq {
            return Err(JournalError::Mismatch(format!(
                "cannot restart the log after seq {prev}: {} entries retained, newest seq {}",
                self.retained.len(),
                self.last_seq
            )));
        }
        let bs = self.hdr.bs();
        let zeros = vec![0u8; bs as usize];
        // Where a scan looks for the first entry: the tail, and the wrap position.
        for off in [self.head, bs] {
            if off + bs <= self.hdr.capacity {
                self.dev
                    .write_at(&zeros, off)
                    .map_err(JournalError::io("restarting the log"))?;
            }
        }
        let tail = if self.head + bs <= self.hdr.capacity {
            self.head
        } else {
            bs
        };
        self.head = tail;
        self.last_seq = prev;
        self.written_seq = prev;
        self.next = self.next.max(prev.next());
        let reserve = Seq(self.next.0 + SEQ_RESERVE_STEP);
        self.update_header(|h| {
            h.tail_offset = tail;
            h.tail_prev_seq = prev;
            h.seq_reserved = h.seq_reserved.max(reserve);
        })
    }

    /// Forgets retained entries up to `seq` (their space becomes free once the header
    /// recording the new tail is written, see [`Journal::persist_tail`]).
    pub fn release_through(&mut self, seq: Seq) {
        while self.retained.front().is_some_and(|e| e.seq <= seq) {
            self.retained.pop_front();
        }
    }

    /// The tail fields a header should record now.
    fn tail(&self) -> (u64, Seq) {
        match self.retained.front() {
            Some(e) => (e.offset, e.prev_seq),
            None => (self.head, self.last_seq),
        }
    }

    /// Writes a header recording the current tail and `checkpoint_seq` (durable on return).
    pub fn persist_tail(&mut self, checkpoint_seq: Seq, clean: bool) -> Result<(), JournalError> {
        let (tail_offset, tail_prev_seq) = self.tail();
        let next = self.next_seq();
        self.update_header(|h| {
            h.tail_offset = tail_offset;
            h.tail_prev_seq = tail_prev_seq;
            h.checkpoint_seq = checkpoint_seq;
            h.clean = clean;
            if clean {
                h.seq_reserved = next;
            }
        })
    }

    /// Reads the image of descriptor `idx` of `info` into `buf` and checks its checksum.
    pub fn read_image(
        &self,
        info: &EntryInfo,
        idx: usize,
        buf: &mut [u8],
    ) -> Result<(), JournalError> {
        let bs = self.hdr.bs();
        let bad = |reason: String| JournalError::BadEntry {
            seq: info.seq,
            offset: info.offset,
            reason,
        };
        let d = info
            .descriptors
            .get(idx)
            .ok_or_else(|| bad(format!("no descriptor {idx}")))?;
        if d.kind != DescriptorKind::Image {
            return Err(bad(format!("block {} is not an image", d.block)));
        }
        let nth = info.descriptors[..idx]
            .iter()
            .filter(|d| d.kind == DescriptorKind::Image)
            .count() as u64;
        let off = info.offset + EntryInfo::images_start(info.descriptors.len(), bs) + nth * bs;
        self.dev
            .read_at(buf, off)
            .map_err(JournalError::io("reading a journal image"))?;
        if crc32c(buf) != d.crc {
            return Err(bad(format!(
                "image of block {} fails its checksum",
                d.block
            )));
        }
        Ok(())
    }

    /// Reads and validates a retained entry (for replay and for the replication pump).
    pub fn read_entry(&self, loc: &EntryLoc) -> Result<EntryInfo, JournalError> {
        self.entry_buf(loc).map(|(e, _)| e)
    }

    /// A retained entry, checked, with its bytes.
    fn entry_buf(&self, loc: &EntryLoc) -> Result<(EntryInfo, Vec<u8>), JournalError> {
        self.try_entry_buf(loc.offset, loc.prev_seq, 0)
            .map_err(|reason| JournalError::BadEntry {
                seq: loc.seq,
                offset: loc.offset,
                reason,
            })
    }

    /// Reads a retained entry with the content of its IMAGE blocks, in descriptor order
    /// (IN_PLACE blocks are `None`: their content is in the normal area).
    pub fn read_entry_images(&self, loc: &EntryLoc) -> Result<(EntryInfo, Images), JournalError> {
        let (info, buf) = self.entry_buf(loc)?;
        let bs = self.hdr.bs() as usize;
        let mut at = EntryInfo::images_start(info.descriptors.len(), bs as u64) as usize;
        let mut images = Vec::with_capacity(info.descriptors.len());
        for d in &info.descriptors {
            if d.kind == DescriptorKind::Image {
                images.push(Some(buf[at..at + bs].to_vec()));
                at += bs;
            } else {
                images.push(None);
            }
        }
        Ok((info, images))
    }

    /// The block numbers a retained entry writes, reading only its header and descriptors
    /// (checked against their checksums), not its images.
    pub fn read_blocks(&self, loc: &EntryLoc) -> Result<Vec<BlockNo>, JournalError> {
        let bs = self.hdr.bs();
        let bad = |reason: String| JournalError::BadEntry {
            seq: loc.seq,
            offset: loc.offset,
            reason,
        };
        let n = loc.n_blocks as usize;
        let len = EntryInfo::images_start(n, bs).min(loc.total_len);
        let mut buf = vec![0u8; len as usize];
        self.dev
            .read_at(&mut buf, loc.offset)
            .map_err(JournalError::io("reading an entry's descriptors"))?;
        let raw = self.parse_header(&buf[..ENTRY_HEADER_LEN]).map_err(bad)?;
        if raw.seq != loc.seq || raw.n_blocks as usize != n {
            return Err(bad("the entry is not the one indexed".into()));
        }
        let dend = ENTRY_HEADER_LEN + DESCRIPTOR_LEN * n;
        if buf.len() < dend || crc32c(&buf[ENTRY_HEADER_LEN..dend]) != raw.descr_crc {
            return Err(bad("descriptor checksum mismatch".into()));
        }
        Ok((0..n)
            .map(|i| get_u64(&buf[ENTRY_HEADER_LEN + i * DESCRIPTOR_LEN..], 0))
            .collect())
    }

    /// The retained entry with this seq.
    pub fn find(&self, seq: Seq) -> Option<EntryLoc> {
        let i = self.retained.partition_point(|e| e.seq < seq);
        self.retained.get(i).filter(|e| e.seq == seq).copied()
    }
}

struct RawHeader {
    flags: u16,
    seq: Seq,
    prev_seq: Seq,
    timestamp_ns: u64,
    mount_gen: u64,
    n_blocks: u32,
    n_tx: u32,
    total_len: u64,
    descr_crc: u32,
    durable_seq: Seq,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crash::CrashDevice;
    use crate::device::MemDevice;

    const BS: u32 = 4096;

    fn expect() -> JournalExpect {
        JournalExpect {
            block_size: BS,
            normal_blocks: 1000,
        }
    }

    fn fresh(cap_blocks: u64) -> Arc<MemDevice> {
        let dev = Arc::new(MemDevice::new(cap_blocks * u64::from(BS)));
        Journal::format(&*dev, VolumeId([7; 16]), BS, 1000).unwrap();
        dev
    }

    fn img(byte: u8) -> Vec<u8> {
        vec![byte; BS as usize]
    }

    fn append(j: &mut Journal, blocks: &[(u64, u8)]) -> EntryLoc {
        let imgs: Vec<Vec<u8>> = blocks.iter().map(|(_, b)| img(*b)).collect();
        let bl: Vec<(u64, EntryBlock<'_>)> = blocks
            .iter()
            .zip(&imgs)
            .map(|((n, _), i)| (*n, EntryBlock::Image(i)))
            .collect();
        j.append(&NewEntry {
            seq: None,
            timestamp_ns: 42,
            n_tx: 1,
            flags: 0,
            blocks: &bl,
        })
        .unwrap()
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let h = JournalHeader {
            generation: 9,
            volume_id: VolumeId([3; 16]),
            block_size: BS,
            capacity: 1 << 20,
            normal_blocks: 77,
            mount_gen: 4,
            tail_offset: 8192,
            tail_prev_seq: Seq(5),
            checkpoint_seq: Seq(5),
            seq_reserved: Seq(100),
            clean: true,
        };
        let mut b = h.encode();
        assert_eq!(JournalHeader::decode(&b).unwrap(), h);
        b[70] ^= 1;
        assert!(JournalHeader::decode(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn the_info_an_append_returns_is_what_reading_the_entry_back_gives() {
        let dev = fresh(64);
        let (mut j, _) = Journal::open(Box::new(dev), expect()).unwrap();
        j.begin_session().unwrap();
        append(&mut j, &[(1, 1)]);
        j.sync().unwrap(); // a durable seq the next entry records
        let (a, b) = (img(5), img(6));
        let blocks = [
            (3, EntryBlock::Image(&a)),
            (4, EntryBlock::InPlace(77)),
            (5, EntryBlock::InPlaceFresh(88)),
            (9, EntryBlock::Image(&b)),
        ];
        let (loc, info) = j
            .append_with_info(&NewEntry {
                seq: None,
                timestamp_ns: 43,
                n_tx: 3,
                flags: FLAG_FREES,
                blocks: &blocks,
            })
            .unwrap();
        assert_eq!(info, j.read_entry(&loc).unwrap());
    }

    #[test]
    fn entries_survive_reopen_in_order() {
        let dev = fresh(64);
        let (mut j, e) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        assert!(e.is_empty());
        j.begin_session().unwrap();
        let a = append(&mut j, &[(1, 1), (2, 2)]);
        let b = append(&mut j, &[(3, 3)]);
        assert!(b.seq > a.seq);
        assert_eq!(b.prev_seq, a.seq);
        j.sync().unwrap();
        drop(j);
        let (j, e) = Journal::open(Box::new(dev), expect()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].seq, a.seq);
        assert_eq!(e[1].descriptors[0].block, 3);
        let mut buf = img(0);
        j.read_image(&e[0], 1, &mut buf).unwrap();
        assert_eq!(buf, img(2));
        // Not closed cleanly: the next seq is past the whole reservation.
        assert!(j.next_seq() > b.seq);
    }

    #[test]
    fn clean_close_continues_the_sequence_without_a_gap() {
        let dev = fresh(64);
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        let a = append(&mut j, &[(1, 1)]);
        j.sync().unwrap();
        j.release_through(a.seq);
        j.persist_tail(a.seq, true).unwrap();
        let (j, e) = Journal::open(Box::new(dev), expect()).unwrap();
        assert!(e.is_empty());
        assert_eq!(j.next_seq(), a.seq.next());
    }

    #[test]
    fn wrap_around_and_release() {
        let dev = fresh(16); // 15 blocks for entries
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        let mut last = Seq::NONE;
        for round in 0..20u8 {
            // Each entry is 1 header block + 3 images = 4 blocks.
            let l = append(&mut j, &[(1, round), (2, round), (3, round)]);
            assert!(l.seq > last);
            last = l.seq;
            j.sync().unwrap();
            j.release_through(l.seq);
            j.persist_tail(l.seq, false).unwrap();
        }
        let (_, e) = Journal::open(Box::new(dev), expect()).unwrap();
        assert!(e.is_empty(), "everything released");
    }

    #[test]
    fn full_journal_refuses_without_overwriting_retained() {
        let dev = fresh(16);
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        append(&mut j, &[(1, 1), (2, 1), (3, 1)]);
        append(&mut j, &[(1, 2), (2, 2), (3, 2)]);
        append(&mut j, &[(1, 3), (2, 3), (3, 3)]);
        let big: Vec<(u64, u8)> = (0..5).map(|i| (i, 9)).collect();
        let imgs: Vec<Vec<u8>> = big.iter().map(|(_, b)| img(*b)).collect();
        let bl: Vec<(u64, EntryBlock<'_>)> = big
            .iter()
            .zip(&imgs)
            .map(|((n, _), i)| (*n, EntryBlock::Image(i)))
            .collect();
        let err = j
            .append(&NewEntry {
                seq: None,
                timestamp_ns: 1,
                n_tx: 1,
                flags: 0,
                blocks: &bl,
            })
            .unwrap_err();
        assert!(matches!(err, JournalError::Full { .. }), "{err}");
        let bl: Vec<(u64, EntryBlock<'_>)> =
            (0..20).map(|n| (n, EntryBlock::Image(&imgs[0]))).collect();
        let err = j
            .append(&NewEntry {
                seq: None,
                timestamp_ns: 1,
                n_tx: 1,
                flags: 0,
                blocks: &bl,
            })
            .unwrap_err();
        assert!(matches!(err, JournalError::TooLarge { .. }), "{err}");
        j.sync().unwrap();
        let (_, e) = Journal::open(Box::new(dev), expect()).unwrap();
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn torn_last_entry_is_dropped_but_durable_prefix_kept() {
        let dev = Arc::new(CrashDevice::new(64 * u64::from(BS)));
        Journal::format(&*dev, VolumeId([7; 16]), BS, 1000).unwrap();
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        append(&mut j, &[(1, 1)]);
        j.sync().unwrap();
        append(&mut j, &[(2, 2), (3, 3)]);
        let cp = dev.crash_point();
        // Every way of tearing the second entry: it is either whole or gone.
        for keep_mask in [0u64, 1, 0b1010_1010, u64::MAX >> 1] {
            let imgb = cp.image_with(|i| i < 64 && keep_mask >> i & 1 == 1);
            let d2 = MemDevice::from_bytes(imgb);
            let (_, e) = Journal::open(Box::new(d2), expect()).unwrap();
            assert!(e.len() == 1 || e.len() == 2);
            assert_eq!(e[0].descriptors[0].block, 1);
        }
        let all = MemDevice::from_bytes(cp.image_with(|_| true));
        assert_eq!(Journal::open(Box::new(all), expect()).unwrap().1.len(), 2);
    }

    #[test]
    fn corrupt_durable_entry_in_the_middle_is_an_error() {
        let dev = fresh(64);
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        let a = append(&mut j, &[(1, 1)]);
        j.sync().unwrap();
        let b = append(&mut j, &[(2, 2)]);
        j.sync().unwrap();
        append(&mut j, &[(3, 3)]);
        j.sync().unwrap();
        drop(j);
        // Flip a byte in the image of entry b: checksums catch it, and entry c proves b
        // had been durable.
        let mut bytes = dev.to_bytes();
        bytes[(b.offset + u64::from(BS) + 10) as usize] ^= 0xff;
        let err = Journal::open(Box::new(MemDevice::from_bytes(bytes)), expect()).unwrap_err();
        match err {
            JournalError::Corrupt { after, .. } => assert_eq!(after, a.seq),
            e => panic!("unexpected {e}"),
        }
        // Corrupting the header of b is caught the same way.
        let mut bytes = dev.to_bytes();
        bytes[(b.offset + 9) as usize] ^= 0xff;
        assert!(matches!(
            Journal::open(Box::new(MemDevice::from_bytes(bytes)), expect()),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn bad_headers_and_mismatches_are_clear_errors() {
        let dev = fresh(64);
        let mut bytes = dev.to_bytes();
        bytes[3] ^= 1;
        bytes[HEADER_SLOT + 3] ^= 1;
        let err = Journal::open(Box::new(MemDevice::from_bytes(bytes)), expect()).unwrap_err();
        assert!(err.to_string().contains("invalid in both slots"), "{err}");
        let err = Journal::open(
            Box::new(dev),
            JournalExpect {
                block_size: BS,
                normal_blocks: 5,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("1000 blocks"), "{err}");
    }

    #[test]
    fn seqs_are_never_reused_after_a_crash() {
        let dev = Arc::new(CrashDevice::new(64 * u64::from(BS)));
        Journal::format(&*dev, VolumeId([7; 16]), BS, 1000).unwrap();
        let (mut j, _) = Journal::open(Box::new(dev.clone()), expect()).unwrap();
        j.begin_session().unwrap();
        append(&mut j, &[(1, 1)]);
        j.sync().unwrap();
        let lost = append(&mut j, &[(2, 2)]); // never synced
        let img = dev.crash_point().durable_image();
        let (mut j2, e) = Journal::open(Box::new(MemDevice::from_bytes(img)), expect()).unwrap();
        assert_eq!(e.len(), 1);
        j2.begin_session().unwrap();
        let fresh_entry = append(&mut j2, &[(3, 3)]);
        assert!(
            fresh_entry.seq > lost.seq,
            "{:?} vs {:?}",
            fresh_entry.seq,
            lost.seq
        );
        assert_eq!(fresh_entry.prev_seq, e[0].seq);
    }
}
