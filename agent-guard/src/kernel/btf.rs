//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find the
//! byte offset of a struct member: the Unix socket hooks need two fields
//! of `struct bpf_sock_addr_kern`, whose layout is the kernel's business.
//!
//! (aya-obj parses BTF but keeps member offsets crate-private; the BTF
//! crates on crates.io are LGPL. The format is small and stable:
//! Documentation/bpf/btf.rst.)

use std::collections::HashMap;

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} in the kernel BTF has no member {member}")]
    NoMember { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Parsed type and string sections.
pub struct Btf {
    data: Vec<u8>,
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|source| BtfError::Read {
            path: VMLINUX.to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("short header"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let field = |at| u32_at(&data, at).ok_or(BtfError::Malformed("short header"));
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types.end > data.len() || strings.end > data.len() {
            return Err(BtfError::Malformed("sections past the end"));
        }
        Ok(Self {
            data,
            types,
            strings,
        })
    }

    fn name(&self, off: u32) -> Option<&[u8]> {
        let s = &self.data[self.strings.clone()];
        let rest = s.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    }

    /// Byte offsets of `members` in the first struct called `strukt`.
    pub fn member_offsets(
        &self,
        strukt: &str,
        members: &[&str],
    ) -> Result<HashMap<String, u32>, BtfError> {
        let d = &self.data[self.types.clone()];
        let mut at = 0usize;
        while at + 12 <= d.len() {
            let name_off = u32_at(d, at).ok_or(BtfError::Malformed("type"))?;
            let info = u32_at(d, at + 4).ok_or(BtfError::Malformed("type"))?;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,
                2 | 7..=12 | 16 | 18 => 0,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            let body = at + 12;
            if kind == KIND_STRUCT && self.name(name_off) == Some(strukt.as_bytes()) {
                let mut out = HashMap::new();
                for m in 0..vlen {
                    let mat = body + 12 * m;
                    let mname = u32_at(d, mat).ok_or(BtfError::Malformed("member"))?;
                    let moff = u32_at(d, mat + 8).ok_or(BtfError::Malformed("member"))?;
                    // With kind_flag, the low 24 bits are the bit offset.
                    let bits = if kind_flag { moff & 0x00ff_ffff } else { moff };
                    if let Some(n) = self.name(mname)
                        && let Some(want) = members.iter().find(|w| w.as_bytes() == n)
                        && bits % 8 == 0
                    {
                        out.insert((*want).to_string(), bits / 8);
                    }
                }
                for want in members {
                    if !out.contains_key(*want) {
                        return Err(BtfError::NoMember {
                            strukt: strukt.to_string(),
                            member: (*want).to_string(),
                        });
                    }
                }
                return Ok(out);
            }
            at = body + extra;
        }
        Err(BtfError::NoStruct(strukt.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage() {
        assert!(matches!(
            Btf::parse(vec![1, 2, 3]),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            Btf::parse(vec![0; 24]),
            Err(BtfError::Malformed(_))
        ));
    }

    /// On this machine's kernel (6.7+), the layout the Unix hooks need.
    #[test]
    fn finds_bpf_sock_addr_kern_on_this_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no {VMLINUX}; skipped");
            return;
        };
        match btf.member_offsets("bpf_sock_addr_kern", &["uaddr", "uaddrlen"]) {
            Ok(o) => {
                assert_eq!(o["uaddr"], 8, "uaddr follows the sk pointer");
                assert!(o["uaddrlen"] > o["uaddr"]);
            }
            // Kernels before 6.7 have no uaddrlen (and no Unix hooks).
            Err(BtfError::NoMember { member, .. }) => assert_eq!(member, "uaddrlen"),
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(
            btf.member_offsets("no_such_struct_here", &["x"]),
            Err(BtfError::NoStruct(_))
        ));
    }
}
