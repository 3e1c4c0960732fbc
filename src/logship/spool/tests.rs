use super::legacy::LEGACY_MAGIC;
use super::*;
use crate::logship::proto::{encode_log_field, Log, LogGroup, LogTag};
use prost::Message;
use std::fs::OpenOptions;

fn open(dir: &Path, max_bytes: u64) -> Arc<Spool> {
    Arc::new(Spool::open(dir, max_bytes).unwrap())
}

fn key(logstore: &str) -> GroupKey {
    GroupKey {
        project: None,
        logstore: logstore.into(),
        topic: String::new(),
        source: String::new(),
        tags: vec![],
    }
}

/// Files in the spool directory with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// Bytes of every file directly in the spool directory.
fn bytes_on_disk(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn group(ids: &[u32]) -> LogGroup {
    LogGroup {
        logs: ids
            .iter()
            .map(|id| Log {
                time: *id,
                contents: vec![],
                time_ns: Some(*id),
            })
            .collect(),
        reserved: None,
        topic: Some("topic".into()),
        source: Some("10.0.0.1".into()),
        log_tags: vec![LogTag {
            key: "tenant".into(),
            value: "t1".into(),
        }],
    }
}

fn encoded(ids: &[u32]) -> Vec<u8> {
    group(ids).encode_to_vec()
}

fn times(batch: &SpooledBatch) -> Vec<u32> {
    LogGroup::decode(batch.log_group.clone())
        .unwrap()
        .logs
        .iter()
        .map(|log| log.time)
        .collect()
}

/// Writes a batch in the one-file-per-batch format of earlier versions.
fn write_legacy(dir: &Path, seq: u64, key: &GroupKey, records: usize, log_group: &[u8]) {
    let header = BatchHeader {
        key: key.clone(),
        records,
        created_ns: now_ns(),
    };
    let header = serde_json::to_vec(&header).unwrap();
    let mut data = LEGACY_MAGIC.to_vec();
    data.extend_from_slice(&(header.len() as u32).to_be_bytes());
    data.extend_from_slice(&header);
    data.extend_from_slice(log_group);
    fs::write(dir.join(format!("{seq:016x}.batch")), data).unwrap();
}

#[test]
fn write_read_remove() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let seq = spool.write(&key("ls"), 2, b"payload").unwrap();
    let batch = spool.read(seq).unwrap();
    assert_eq!(batch.header.key.logstore, "ls");
    assert_eq!(batch.header.records, 2);
    assert_eq!(&batch.log_group[..], b"payload");
    assert!(spool.usage().0 > 7);
    spool.remove(&[seq]).unwrap();
    assert_eq!(spool.usage().0, 0);
    assert_eq!(spool.first(), None);
    assert!(files(dir.path(), ".seg").is_empty());
}

#[test]
fn one_commit_writes_several_batches_to_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let (a, b) = (encoded(&[1, 2]), encoded(&[3]));
    let seqs = spool
        .write_batches(&[
            NewBatch {
                key: &key("aa"),
                records: 2,
                log_group: &a,
                logs_len: 0,
            },
            NewBatch {
                key: &key("bb"),
                records: 1,
                log_group: &b,
                logs_len: 0,
            },
        ])
        .unwrap();
    assert_eq!(seqs.len(), 2);
    assert_eq!(files(dir.path(), ".seg").len(), 1);
    assert_eq!(times(&spool.read(seqs[0]).unwrap()), vec![1, 2]);
    assert_eq!(spool.read(seqs[1]).unwrap().header.key.logstore, "bb");
}

#[test]
fn reopen_finds_batches_and_drops_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let first = spool.write(&key("a1"), 1, b"one").unwrap();
    let second = spool.write(&key("b1"), 1, b"two").unwrap();
    drop(spool);
    fs::write(dir.path().join("0000000000000009.tmp"), b"partial").unwrap();
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.first(), Some(first));
    assert_eq!(spool.usage().1, 2);
    assert_eq!(&spool.read(second).unwrap().log_group[..], b"two");
    assert!(!dir.path().join("0000000000000009.tmp").exists());
    let third = spool.write(&key("c1"), 1, b"three").unwrap();
    assert!(third > second);
    assert_eq!(
        files(dir.path(), ".seg").len(),
        2,
        "a restart opens a new segment"
    );
}

#[test]
fn damaged_frame_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let seq = spool.write(&key("ls"), 1, b"record").unwrap();
    let kept = spool.write(&key("ls"), 1, b"other").unwrap();
    let segment = files(dir.path(), ".seg").remove(0);
    let mut data = fs::read(&segment).unwrap();
    let at = data.windows(6).position(|w| w == b"record").unwrap();
    data[at] ^= 0x20;
    fs::write(&segment, data).unwrap();

    let err = spool.read(seq).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let moved = spool.quarantine(seq).unwrap();
    assert!(fs::read(&moved).unwrap().windows(6).any(|w| w == b"Record"));
    assert_eq!(spool.first(), Some(kept));
    assert_eq!(&spool.read(kept).unwrap().log_group[..], b"other");
}

#[test]
fn room_follows_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 4000);
    assert!(spool.has_room(4000 - BATCH_OVERHEAD_BYTES));
    assert!(!spool.has_room(4001 - BATCH_OVERHEAD_BYTES));
    spool.write(&key("ls"), 1, &[0u8; 100]).unwrap();
    let used = spool.usage().0;
    assert!(used > 100);
    assert_eq!(used, bytes_on_disk(dir.path()));
    assert!(spool.has_room(4000 - used - BATCH_OVERHEAD_BYTES));
    assert!(!spool.has_room(4001 - used - BATCH_OVERHEAD_BYTES));
    assert!(!spool.has_room_for(4000 - used - 2 * BATCH_OVERHEAD_BYTES + 1, 2));
}

#[test]
fn bound_holds_with_segments() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 * 1024;
    let spool = open(dir.path(), max);
    let mut seqs = Vec::new();
    let payload = [7u8; 1500];
    while spool.has_room(payload.len() as u64) {
        seqs.push(spool.write(&key("ls"), 1, &payload).unwrap());
        assert!(bytes_on_disk(dir.path()) <= max);
        assert_eq!(spool.usage().0, bytes_on_disk(dir.path()));
    }
    assert!(seqs.len() > 30, "{} batches fit", seqs.len());
    assert!(
        files(dir.path(), ".seg").len() > 1,
        "segments of a sixteenth of the bound"
    );
    // Acknowledging frees whole segments, and the acknowledgement frames stay in
    // the bound.
    for seq in &seqs {
        spool.remove(&[*seq]).unwrap();
        assert!(bytes_on_disk(dir.path()) <= max);
    }
    assert_eq!(spool.usage().0, 0);
    assert!(files(dir.path(), ".seg").is_empty());
}

#[test]
fn segment_deleted_only_after_every_batch_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let a = spool.write(&key("aa"), 1, b"a").unwrap();
    let b = spool.write(&key("bb"), 1, b"b").unwrap();
    let c = spool.write(&key("aa"), 1, b"c").unwrap();
    let segments = files(dir.path(), ".seg");
    assert_eq!(segments.len(), 1);
    spool.remove(&[a, c]).unwrap();
    assert!(segments[0].exists(), "b is not acknowledged yet");
    assert_eq!(&spool.read(b).unwrap().log_group[..], b"b");

    // The acknowledgement survives a restart: only b is sent again.
    drop(spool);
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.usage().1, 1);
    assert_eq!(spool.first(), Some(b));
    spool.remove(&[b]).unwrap();
    assert!(!segments[0].exists());
    assert_eq!(spool.usage(), (0, 0, 0.0));
}

#[test]
fn older_segment_kept_while_newer_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of 4 KiB: each 3000-byte batch gets one of its own.
    let spool = open(dir.path(), 16 * 4096);
    let payload = [1u8; 3000];
    let seqs: Vec<u64> = (0..3)
        .map(|_| spool.write(&key("ls"), 1, &payload).unwrap())
        .collect();
    assert_eq!(files(dir.path(), ".seg").len(), 3);
    spool.remove(&seqs[1..]).unwrap();
    assert_eq!(files(dir.path(), ".seg").len(), 1);
    assert_eq!(spool.first(), Some(seqs[0]));
    assert_eq!(spool.read(seqs[0]).unwrap().log_group.len(), 3000);
}

#[test]
fn torn_tail_is_cut_off_and_earlier_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let a = spool.write(&key("ls"), 1, &encoded(&[1])).unwrap();
    let b = spool.write(&key("ls"), 1, &encoded(&[2])).unwrap();
    let c = spool.write(&key("ls"), 1, &encoded(&[3])).unwrap();
    drop(spool);
    let segment = files(dir.path(), ".seg").remove(0);
    let full = fs::metadata(&segment).unwrap().len();
    // The last frame was half written when the machine stopped.
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.set_len(full - 10).unwrap();
    drop(file);

    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.usage().1, 2);
    assert_eq!(times(&spool.read(a).unwrap()), vec![1]);
    assert_eq!(times(&spool.read(b).unwrap()), vec![2]);
    assert!(spool.read(c).is_err());
    assert!(fs::metadata(&segment).unwrap().len() < full - 10, "cut");
    assert!(
        !dir.path().join("corrupt").exists(),
        "a torn tail is no damage"
    );
    let d = spool.write(&key("ls"), 1, &encoded(&[4])).unwrap();
    assert!(d > b);
    drop(spool);
    let spool = open(dir.path(), 1 << 20);
    let plan = spool.plan(1 << 20, 100).unwrap();
    assert_eq!(plan.seqs, vec![a, b, d]);
    assert_eq!(
        times(&spool.read_merged(&plan.seqs).unwrap()),
        vec![1, 2, 4]
    );
}

#[test]
fn bad_crc_in_last_frame_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let a = spool.write(&key("ls"), 1, b"first").unwrap();
    spool.write(&key("ls"), 1, b"second").unwrap();
    drop(spool);
    let segment = files(dir.path(), ".seg").remove(0);
    let mut data = fs::read(&segment).unwrap();
    let at = data.windows(6).position(|w| w == b"second").unwrap();
    data[at] = b'S';
    // Zeros after the end, as a preallocated or extended file has.
    data.extend_from_slice(&[0u8; 64]);
    fs::write(&segment, data).unwrap();

    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.usage().1, 1);
    assert_eq!(&spool.read(a).unwrap().log_group[..], b"first");
    assert_eq!(spool.usage().0, fs::metadata(&segment).unwrap().len());
}

#[test]
fn damage_in_an_older_segment_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 16 * 4096);
    let a = spool.write(&key("ls"), 1, &[b'a'; 1000]).unwrap();
    let b = spool.write(&key("ls"), 1, &[b'b'; 1000]).unwrap();
    let c = spool.write(&key("ls"), 1, &[b'c'; 3000]).unwrap();
    drop(spool);
    let segments = files(dir.path(), ".seg");
    assert_eq!(segments.len(), 2, "c goes to a new segment");
    let mut data = fs::read(&segments[0]).unwrap();
    let at = data.windows(4).position(|w| w == b"bbbb").unwrap();
    data[at] = b'x';
    fs::write(&segments[0], data).unwrap();

    let spool = open(dir.path(), 16 * 4096);
    assert_eq!(spool.plan(1 << 20, 100).unwrap().seqs, vec![a, c]);
    assert!(spool.read(b).is_err());
    let moved = files(&dir.path().join("corrupt"), "");
    assert_eq!(moved.len(), 1);
    assert!(fs::read(&moved[0])
        .unwrap()
        .windows(4)
        .any(|w| w == b"xbbb"));
}

#[test]
fn segment_cut_short_at_creation_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let a = spool.write(&key("ls"), 1, b"kept").unwrap();
    drop(spool);
    let empty = dir.path().join("00000000000000ff.seg");
    fs::write(&empty, b"SKI").unwrap();
    let spool = open(dir.path(), 1 << 20);
    assert!(!empty.exists());
    assert_eq!(&spool.read(a).unwrap().log_group[..], b"kept");
}

#[test]
fn segment_without_magic_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("0000000000000003.seg"), b"not a segment").unwrap();
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.first(), None);
    assert!(dir.path().join("corrupt/0000000000000003.seg").exists());
}

#[test]
fn one_file_per_batch_format_is_read() {
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), 5, &key("aa"), 2, &encoded(&[1, 2]));
    write_legacy(dir.path(), 6, &key("aa"), 1, &encoded(&[3]));
    fs::write(dir.path().join("0000000000000007.batch"), b"garbage").unwrap();
    let spool = open(dir.path(), 1 << 20);
    let new = spool.write(&key("aa"), 1, &encoded(&[4])).unwrap();
    assert!(new > 7);

    let plan = spool.plan(1 << 20, 100).unwrap();
    assert_eq!(
        plan.seqs,
        vec![5, 6, new],
        "the unreadable file is not merged"
    );
    let merged = spool.read_merged(&plan.seqs).unwrap();
    assert_eq!(merged.header.records, 4);
    assert_eq!(merged.log_group.as_ref(), encoded(&[1, 2, 3, 4]).as_slice());
    spool.remove(&plan.seqs).unwrap();
    assert!(files(dir.path(), ".batch").len() == 1);
    assert!(files(dir.path(), ".seg").is_empty());

    assert_eq!(spool.first(), Some(7));
    let err = spool.read(7).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let moved = spool.quarantine(7).unwrap();
    assert_eq!(fs::read(moved).unwrap(), b"garbage");
    assert_eq!(spool.usage().0, 0);
}

#[test]
fn plan_merges_one_group_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let a1 = spool.write(&key("aa"), 2, &encoded(&[1, 2])).unwrap();
    let b1 = spool.write(&key("bb"), 1, &encoded(&[3])).unwrap();
    let a2 = spool.write(&key("aa"), 1, &encoded(&[4])).unwrap();
    let a3 = spool.write(&key("aa"), 2, &encoded(&[5, 6])).unwrap();

    let plan = spool.plan(1 << 20, 3).unwrap();
    assert_eq!(plan.seqs, vec![a1, a2], "a3 would pass 3 records");
    assert!(plan.full);
    let merged = spool.read_merged(&plan.seqs).unwrap();
    assert_eq!(merged.header.records, 3);
    assert_eq!(times(&merged), vec![1, 2, 4]);

    let roomy = spool.plan(1 << 20, 100).unwrap();
    assert_eq!(roomy.seqs, vec![a1, a2, a3]);
    assert!(!roomy.full);
    spool.remove(&[a1, a2, a3]).unwrap();
    assert_eq!(spool.plan(1 << 20, 100).unwrap().seqs, vec![b1]);
}

#[test]
fn merged_batch_encodes_like_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let first = spool.write(&key("aa"), 2, &encoded(&[1, 2])).unwrap();
    // A batch as the batcher writes it, with the length of its logs.
    let mut logs = Vec::new();
    for log in &group(&[3]).logs {
        encode_log_field(log, &mut logs);
    }
    let logs_len = logs.len();
    let whole = encoded(&[3]);
    assert_eq!(&whole[..logs_len], &logs[..]);
    let second = spool
        .write_batches(&[NewBatch {
            key: &key("aa"),
            records: 1,
            log_group: &whole,
            logs_len,
        }])
        .unwrap()[0];
    let merged = spool.read_merged(&[first, second]).unwrap();
    assert_eq!(merged.header.records, 3);
    assert_eq!(merged.log_group.as_ref(), encoded(&[1, 2, 3]).as_slice());
    let reversed = spool.read_merged(&[second, first]).unwrap();
    assert_eq!(reversed.log_group.as_ref(), encoded(&[3, 1, 2]).as_slice());
}

fn open_preallocated(dir: &Path, max_bytes: u64, segment_bytes: u64) -> Arc<Spool> {
    Arc::new(Spool::open_with(dir, max_bytes, segment_bytes, true).unwrap())
}

#[test]
fn preallocated_segments_hold_records_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let max = 1 << 20;
    let spool = open_preallocated(dir.path(), max, 16 * 1024);
    let mut seqs = Vec::new();
    for i in 0..40u32 {
        seqs.push(spool.write(&key("ls"), 1, &encoded(&[i; 200])).unwrap());
        spool.wait_for_spare();
        assert_eq!(spool.usage().0, bytes_on_disk(dir.path()), "after {i}");
    }
    let segments = files(dir.path(), ".seg");
    assert!(segments.len() > 2);
    assert_eq!(
        fs::metadata(segments.last().unwrap()).unwrap().len(),
        16 * 1024,
        "the newest segment is preallocated"
    );
    // Acknowledging some leaves holes that a restart must not fill.
    spool.remove(&seqs[..5]).unwrap();
    spool.wait_for_spare();
    drop(spool);

    let spool = open(dir.path(), max);
    assert!(!dir.path().join(SPARE_NAME).exists());
    assert!(!dir.path().join("corrupt").exists(), "zeros are no damage");
    assert_eq!(spool.usage().0, bytes_on_disk(dir.path()));
    let plan = spool.plan(1 << 30, 1 << 20).unwrap();
    assert_eq!(plan.seqs, seqs[5..].to_vec());
    let merged = spool.read_merged(&plan.seqs).unwrap();
    assert_eq!(merged.header.records, 35);
}

#[test]
fn torn_tail_before_preallocated_zeros_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_preallocated(dir.path(), 1 << 20, 16 * 1024);
    // The first segment is created on demand; the second is the spare.
    let first = spool.write(&key("ls"), 1, &[1u8; 16300]).unwrap();
    spool.wait_for_spare();
    let a = spool.write(&key("ls"), 1, &encoded(&[7])).unwrap();
    let b = spool.write(&key("ls"), 1, &encoded(&[8])).unwrap();
    drop(spool);
    let newest = files(dir.path(), ".seg").pop().unwrap();
    assert_eq!(fs::metadata(&newest).unwrap().len(), 16 * 1024);
    // b's frame was half on disk: keep its first bytes, zero the rest.
    let mut data = fs::read(&newest).unwrap();
    let b_end = data.iter().rposition(|&byte| byte != 0).unwrap() + 1;
    let b_seq_at = data.windows(8).rposition(|w| w == b.to_le_bytes()).unwrap();
    let b_start = b_seq_at - 1 - frame::FRAME_HEADER_BYTES;
    let middle = (b_start + b_end) / 2;
    data[middle..b_end].fill(0);
    fs::write(&newest, data).unwrap();

    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.plan(1 << 30, 100).unwrap().seqs, vec![first, a]);
    assert_eq!(times(&spool.read(a).unwrap()), vec![7]);
    assert_eq!(fs::metadata(&newest).unwrap().len(), b_start as u64);
}

#[test]
fn spare_segment_counts_against_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 * 1024;
    let spool = open_preallocated(dir.path(), max, 16 * 1024);
    let payload = [3u8; 3000];
    let mut seqs = Vec::new();
    while spool.has_room(payload.len() as u64) {
        seqs.push(spool.write(&key("ls"), 1, &payload).unwrap());
        spool.wait_for_spare();
        assert!(bytes_on_disk(dir.path()) <= max);
        assert_eq!(spool.usage().0, bytes_on_disk(dir.path()));
    }
    assert!(seqs.len() >= 12, "{} batches fit", seqs.len());
    spool.remove(&seqs).unwrap();
    spool.wait_for_spare();
    assert_eq!(spool.usage().0, bytes_on_disk(dir.path()));
    assert!(
        spool.usage().0 <= 2 * 16 * 1024,
        "what is left is one segment and a spare"
    );
}

#[test]
fn emptied_segment_is_reused_as_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let segment_bytes = 16 * 1024;
    let spool = open_preallocated(dir.path(), 1 << 20, segment_bytes);
    let write = |byte: u8| {
        let seq = spool.write(&key("ls"), 1, &[byte; 5000]).unwrap();
        spool.wait_for_spare();
        seq
    };
    // Write until a second segment exists.
    let mut first = Vec::new();
    while files(dir.path(), ".seg").len() < 2 {
        first.push(write(5));
    }
    let emptied = files(dir.path(), ".seg").remove(0);
    let kept = first.pop().unwrap();
    spool.remove(&first).unwrap();
    spool.wait_for_spare();
    assert!(!emptied.exists());
    let spare = dir.path().join(SPARE_NAME);
    assert_eq!(fs::metadata(&spare).unwrap().len(), segment_bytes);
    assert_eq!(spool.usage().0, bytes_on_disk(dir.path()));

    // Write until the kept file is a segment again, its old frames after
    // the new ones.
    let mut more = Vec::new();
    while spare.exists() {
        assert!(more.len() < 10, "the spare is never used");
        more.push(write(6));
    }
    let reused = files(dir.path(), ".seg").pop().unwrap();
    assert_eq!(spool.read(*more.last().unwrap()).unwrap().log_group[0], 6);
    drop(spool);

    let spool = open(dir.path(), 1 << 20);
    let plan = spool.plan(1 << 30, 100).unwrap();
    let mut expected = vec![kept];
    expected.extend(&more);
    assert_eq!(
        plan.seqs, expected,
        "the reused file's old batches stay gone"
    );
    assert!(!dir.path().join("corrupt").exists());
    assert!(
        fs::metadata(&reused).unwrap().len() < segment_bytes,
        "cut after its frames"
    );
}
