//! What a decision produces, shared by the decision path (`decide`) and
//! the record writer (`emit`) without either importing the other.

/// Return value that lets the call proceed.
pub const ALLOW: i32 = 1;
/// Return value that makes the call fail with EPERM.
pub const DENY: i32 = 0;

/// The verdict on one call: what matched, and whether it proceeds.
pub struct Judgement {
    pub tool_id: u32,
    pub grant_id: u32,
    pub reason: u8,
    pub verdict: u8,
    /// [`ALLOW`] or [`DENY`], the program's return value.
    pub ret: i32,
}
