//! The spool on a real filesystem that runs out of space.

use plaster_agent::telemetry::spool::{Pushed, RecordKind, Spool};
use plaster_agent_tests::TinyFs;

#[test]
fn a_full_disk_drops_telemetry_with_a_count_and_refuses_events() {
    let fs = TinyFs::mount("64k");
    // The bound is far above the disk's size: the disk fills first.
    let mut spool = Spool::open(fs.dir.path(), 1 << 30).unwrap();
    let mut stored = 0;
    let mut dropped = 0;
    for _ in 0..40 {
        match spool
            .push(RecordKind::Telemetry, "t", &vec![7u8; 4000])
            .unwrap()
        {
            Pushed::Stored(_) => stored += 1,
            Pushed::Dropped => dropped += 1,
        }
    }
    assert!(
        stored >= 10 && dropped >= 10,
        "stored {stored}, dropped {dropped}"
    );
    assert_eq!(spool.dropped(), dropped);
    let err = spool
        .push(RecordKind::Event, "e", &vec![7u8; 4000])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "spool {}: no space left for an event record",
            fs.dir.path().display()
        )
    );
    // What was stored is intact, and the spool works again once there is room.
    let first = spool.ids()[0];
    assert_eq!(spool.read(first).unwrap().payload.len(), 4000);
    spool.remove(first);
    assert!(matches!(
        spool.push(RecordKind::Event, "e", b"small").unwrap(),
        Pushed::Stored(_)
    ));
}
