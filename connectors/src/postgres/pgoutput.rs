//! A decoder for the `pgoutput` logical replication messages (protocol version 1) that the
//! transport hands over as raw `XLogData` payloads: Relation, Type, Insert, Update, Delete,
//! Truncate and Origin. (Begin, Commit and logical Message are framed by the transport.)
//!
//! Every read is bounds-checked: malformed input yields a [`DecodeError`] with the byte
//! offset, never a panic.

use bytes::Bytes;

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {message} message at byte {offset}: {reason}")]
pub struct DecodeError {
    /// Which message was being decoded (`Insert`, `Relation`, …, or `unknown`).
    pub message: &'static str,
    /// Byte offset inside the message where decoding failed.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags; bit 0 set means the column is part of the replica identity.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A Relation message: the shape of a table as of the changes that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<RelationColumn>,
}

/// One column value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// The value's text form.
    Text(Bytes),
    /// The value's binary form (only with the `binary` option).
    Binary(Bytes),
}

/// A decoded change message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Table shape.
    Relation(Relation),
    /// A non-builtin type's name.
    Type {
        /// Type oid.
        oid: u32,
        /// Schema of the type.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Table oid.
        relation: u32,
        /// The row.
        new: Vec<Cell>,
    },
    /// A changed row.
    Update {
        /// Table oid.
        relation: u32,
        /// The old key (`K`) or the old row (`O`, REPLICA IDENTITY FULL), when sent.
        old: Option<OldTuple>,
        /// The new row.
        new: Vec<Cell>,
    },
    /// A deleted row.
    Delete {
        /// Table oid.
        relation: u32,
        /// The old key or old row.
        old: OldTuple,
    },
    /// Tables truncated together.
    Truncate {
        /// Option bits: 1 = CASCADE, 2 = RESTART IDENTITY.
        options: u8,
        /// Table oids.
        relations: Vec<u32>,
    },
    /// The replication origin of the transaction.
    Origin {
        /// Commit LSN on the origin server.
        lsn: u64,
        /// Origin name.
        name: String,
    },
}

/// An old image sent with an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity (key) columns are meaningful; others are null.
    Key(Vec<Cell>),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Vec<Cell>),
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            message: self.message,
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "needs {n} more bytes, {} left",
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("string without terminating NUL"))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|e| self.err(format!("string is not UTF-8: {e}")))?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Cell>, DecodeError> {
        let n = self.u16()? as usize;
        let mut cells = Vec::with_capacity(n);
        for _ in 0..n {
            let cell = match self.u8()? {
                b'n' => Cell::Null,
                b'u' => Cell::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.u32()? as usize;
                    let start = self.pos;
                    self.take(len)?;
                    let bytes = self.buf.slice(start..start + len);
                    if kind == b't' {
                        Cell::Text(bytes)
                    } else {
                        Cell::Binary(bytes)
                    }
                }
                other => return Err(self.err(format!("unknown tuple cell kind {other:#04x}"))),
            };
            cells.push(cell);
        }
        Ok(cells)
    }

    fn expect_new(&mut self) -> Result<Vec<Cell>, DecodeError> {
        match self.u8()? {
            b'N' => self.tuple(),
            other => Err(self.err(format!("expected new tuple marker 'N', got {other:#04x}"))),
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

/// Decodes one `XLogData` payload. Stream and two-phase messages are never requested, so they
/// are reported as unknown message types.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            message: "unknown",
            offset: 0,
            reason: "empty message".into(),
        });
    };
    let message = match tag {
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'O' => "Origin",
        _ => "unknown",
    };
    let mut r = Reader {
        buf,
        pos: 1,
        message,
    };
    let msg = match tag {
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                columns.push(RelationColumn {
                    flags: r.u8()?,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => Message::Insert {
            relation: r.u32()?,
            new: r.expect_new()?,
        },
        b'U' => {
            let relation = r.u32()?;
            let (old, new) = match r.u8()? {
                b'K' => {
                    let old = r.tuple()?;
                    (Some(OldTuple::Key(old)), r.expect_new()?)
                }
                b'O' => {
                    let old = r.tuple()?;
                    (Some(OldTuple::Full(old)), r.expect_new()?)
                }
                b'N' => (None, r.tuple()?),
                other => return Err(r.err(format!("unexpected update tuple marker {other:#04x}"))),
            };
            Message::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(r.err(format!("unexpected delete tuple marker {other:#04x}"))),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { options, relations }
        }
        b'O' => Message::Origin {
            lsn: r.u64()?,
            name: r.cstr()?,
        },
        other => {
            return Err(r.err(format!(
                "unknown message type {:?} ({other:#04x})",
                char::from(other)
            )))
        }
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_bytes() -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&3u16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"42");
        b.push(b'n');
        b.push(b'u');
        b
    }

    #[test]
    fn decodes_insert() {
        let msg = decode(&Bytes::from(insert_bytes())).expect("decodes");
        assert_eq!(
            msg,
            Message::Insert {
                relation: 16384,
                new: vec![
                    Cell::Text(Bytes::from_static(b"42")),
                    Cell::Null,
                    Cell::UnchangedToast
                ]
            }
        );
    }

    #[test]
    fn decodes_relation_and_update_with_old_row() {
        let mut b = vec![b'R'];
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(b"public\0t\0");
        b.push(b'f');
        b.extend_from_slice(&1u16.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"id\0");
        b.extend_from_slice(&20u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        let Message::Relation(rel) = decode(&Bytes::from(b)).expect("relation") else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "t");
        assert_eq!(rel.columns[0].type_modifier, -1);

        let mut u = vec![b'U'];
        u.extend_from_slice(&7u32.to_be_bytes());
        u.push(b'O');
        u.extend_from_slice(&1u16.to_be_bytes());
        u.push(b'n');
        u.push(b'N');
        u.extend_from_slice(&1u16.to_be_bytes());
        u.push(b'n');
        let msg = decode(&Bytes::from(u)).expect("update");
        assert!(matches!(
            msg,
            Message::Update {
                old: Some(OldTuple::Full(_)),
                ..
            }
        ));
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error_not_a_panic() {
        let full = insert_bytes();
        for len in 0..full.len() {
            let err = decode(&Bytes::from(full[..len].to_vec())).expect_err("truncated");
            assert!(err.offset <= len, "{err}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_its_offset() {
        let err = decode(&Bytes::from_static(b"Zxyz")).expect_err("unknown tag");
        assert!(err.reason.contains("unknown message type"));
        let mut b = insert_bytes();
        b.push(0);
        let err = decode(&Bytes::from(b)).expect_err("trailing");
        assert!(err.reason.contains("trailing"));
        let mut b = insert_bytes();
        b[7] = b'x';
        assert!(decode(&Bytes::from(b)).is_err());
        // An absurd length must not allocate or panic.
        let mut b = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&Bytes::from(b)).is_err());
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut b = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let tags = b"RYIUDTO";
            b.push(tags[(x >> 8) as usize % tags.len()]);
            for i in 0..len {
                b.push((x >> (i % 56)) as u8);
            }
            let _ = decode(&Bytes::from(b));
        }
    }
}
