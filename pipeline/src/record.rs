//! One change event as table-topic records: the encoding capture writes to the origin topics
//! and apply writes to the replicated topics, written once.
//!
//! A change goes to the partition its key hashes to (the producer's partitioner, by the Kafka
//! key). A change of a table without a key goes to partition 0: its rows have no identity to
//! hash, and an update or delete must follow the insert it matches, so the whole table keeps one
//! order. A truncate has no key and is a barrier for every key, so it goes to every partition:
//! a consumer of any partition sees it in order with that partition's changes.

use ferry_schemas::{AvroError, ChangeEvent, EncodedSchema, Header, Op};

/// Encodes `event` into `value`, and its key into `key` when the record is keyed (the table
/// has a key and the change is not a truncate); returns whether it is. `key_header` is `None`
/// for a table without a key. The buffers are cleared first and reused across calls.
pub fn encode(
    schema: &EncodedSchema,
    event: &ChangeEvent,
    (key_header, value_header): (Option<Header>, Header),
    key: &mut Vec<u8>,
    value: &mut Vec<u8>,
) -> Result<bool, AvroError> {
    value.clear();
    schema.encode_value_as(value_header, event, value)?;
    key.clear();
    let keyed = event.op != Op::Truncate && schema.has_key();
    if keyed {
        if let (Some(header), Some(image)) = (key_header, event.key_image()) {
            schema.encode_key_as(header, image, key)?;
        }
    }
    Ok(keyed)
}

/// The partitions a record of `op` is produced to: `None` lets the producer's partitioner pick
/// by key; a change of a table without a key (`keyed` false) goes to partition 0; a truncate
/// goes to each of the topic's `partitions`.
pub fn targets(op: Op, partitions: i32, keyed: bool) -> Vec<Option<i32>> {
    if op == Op::Truncate {
        (0..partitions.max(1)).map(Some).collect()
    } else if keyed {
        vec![None]
    } else {
        vec![Some(0)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_fan_out_to_every_partition_and_changes_do_not() {
        for keyed in [true, false] {
            assert_eq!(
                targets(Op::Truncate, 3, keyed),
                vec![Some(0), Some(1), Some(2)]
            );
            assert_eq!(targets(Op::Truncate, 0, keyed), vec![Some(0)]);
        }
        for op in [Op::Create, Op::Update, Op::Delete, Op::Read] {
            assert_eq!(targets(op, 3, true), vec![None], "{op:?}");
            assert_eq!(targets(op, 3, false), vec![Some(0)], "{op:?} without a key");
        }
    }
}
