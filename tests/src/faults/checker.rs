//! Linearizability checker for histories of a replicated key-value store, one register per key.
//!
//! # Model
//!
//! Every key is an independent register that starts *absent* (`None`). Operations on it:
//!
//! * `Read` returns the current value.
//! * `Put { value }` stores `value` unconditionally and returns the value it replaced (`previous`).
//! * `Cas { expected, new }` stores `new` if the current value equals `expected` (`None` = absent, and
//!   `new: None` deletes). It returns `succeeded` and `current`: the new value when it succeeded, the
//!   value it saw when it did not. A CAS that did not succeed is therefore a read that saw
//!   `current != expected`.
//!
//! Linearizability is compositional, so [`check`] splits a history by key and checks each key with
//! [`check_key`] on its own.
//!
//! # Outcome semantics
//!
//! * [`Outcome::Ok`]: the operation took effect exactly once, atomically, at some instant between
//!   `invoke` and `complete`, and the model must produce exactly the reported result there.
//! * [`Outcome::Fail`]: the server refused before acting; the operation never took effect. Fail ops
//!   are dropped, so a value that only a failed write wrote can never be observed.
//! * [`Outcome::Unknown`]: the answer never arrived. The operation may take effect at any instant after
//!   `invoke` (even long after the client gave up) or never, and its result is unconstrained. Unknown
//!   reads are dropped (they change nothing). Unknown writes have no completion: they never have to
//!   precede anything in real time. A `complete` time on an Unknown op is ignored.
//!
//! Real time: operation `a` must be ordered before `b` only if `a.complete < b.invoke`. Equal
//! timestamps count as concurrent (the conservative choice: it can only allow more orders).
//! Writers in the test suite write unique values; the checker never relies on that for
//! correctness (see *Optimizations*), repeated values only make it slower. The `process` field is
//! only reported, never used for checking.
//!
//! A history with structural errors (an op completing before it was invoked, an Ok op without a
//! completion time, a result of the wrong kind, duplicate ids, mixed keys in [`check_key`]) yields
//! [`KeyVerdict::InvalidHistory`]; the checker never panics on its input.
//!
//! # Algorithm
//!
//! The search is the Wing & Gong / Lowe algorithm with memoization ("WGL", as in Knossos' `wgl` and
//! Porcupine). All call and return events are sorted by time (calls before returns at equal times,
//! ties between equal events broken by op id) and put in a doubly linked list. Walking the list from
//! its head, every call met before the first return is a candidate to be linearized next: if the
//! model accepts it, the op is lifted out of the list (call and return), pushed on a stack and the
//! walk restarts from the head. Meeting a return means the op whose return it is was not linearized
//! before it had to be: the search backtracks (pops the stack, unlifts that op, and tries the next
//! candidate after it). Unknown ops have a call but no return entry, so they are always allowed to
//! stay unlinearized: the search succeeds as soon as every Ok op has been linearized. A cache of
//! visited configurations (bitset of linearized ops, register value, and one flag described below)
//! prunes every configuration reached a second time by a different order.
//!
//! # Window
//!
//! When the history is not linearizable, the verdict reports a [`Window`], defined on the event list
//! above (positions count events, so "before position q" is a precise notion even with equal times):
//!
//! 1. **Culprit.** The smallest prefix of the event list ending at a return event that cannot be
//!    linearized. In a prefix, an op whose return is not in it is *in flight*: it may or may not have
//!    taken effect, and if it did, it did so with the result it later reported (that result is a
//!    fact about the op; treating it as unconstrained could only hide violations). Unknown ops
//!    invoked in the prefix may or may not have taken effect. The op whose return ends this prefix
//!    is the [`Window::culprit`]: its answer is the first one that no order explains. Any
//!    linearization of the whole history would also linearize every prefix, so the history is
//!    linearizable exactly when no such prefix exists.
//! 2. **Start values.** For a cut position `q` (the window starts at event `q`), the *ops before the
//!    window* are those invoked before `q`; the ones that returned before `q` must have taken effect,
//!    the others may have (with their reported result, if they have one). The start values `Σ(q)`
//!    are the register values left by some such linearization that is empty or ends with an op whose
//!    result is known. (An Unknown write applied last before the window is not needed here: it is
//!    still available inside the window, see below, and can be placed first there.)
//! 3. **Window ops.** Ops that returned before `q`, or were invoked after the culprit returned, are
//!    outside. Of the others, an op is [`Role::Required`] if invoked at or after `q` and returned by
//!    the culprit's return: it must take effect inside the window. [`Role::MayPrecede`] if invoked
//!    before `q` and returned inside the window: it took effect either inside the window or before
//!    it (then its effect is part of the start value and it is simply left out). [`Role::Optional`]
//!    if still in flight when the culprit returned, or Unknown: it may take effect inside the window
//!    or not at all (or before it).
//! 4. The window at `q` is **unexplainable** if, for every start value in `Σ(q)`, no order of the
//!    required ops plus any subset of the other window ops, respecting real time, is accepted by the
//!    model. Every linearization of the culprit's prefix would give such an order, so an
//!    unexplainable window proves the violation on its own: nothing is blamed on cut-away context.
//!    (At `q = 0` the window is the culprit's whole prefix, which is unexplainable by step 1.)
//! 5. **Shrinking.** The reported cut is the **largest** `q` (latest start, fewest ops) whose window
//!    is unexplainable. Then each required op other than the culprit, in invoke order, is tentatively
//!    *demoted* to "took effect inside its interval or not at all"; the demotion is kept if the
//!    window stays unexplainable (demoting only adds explanations, so the result is still a proof).
//!    Demoted ops are listed as [`Role::Optional`] (or not at all, see below). What remains required
//!    is what the contradiction needs, e.g. just the stale read, with the start values saying which
//!    values the register could hold when it was invoked.
//! 6. [`Window::minimal`] is false only if the search limit stopped the shrinking; the window is then
//!    the whole prefix (`q = 0`) or a partly demoted one, and still unexplainable.
//!
//! Window ops that provably cannot matter are not listed: optional ops that never change the
//! register (reads, CASes that reported failure), and optional writes whose value no other window op
//! observes (see *Optimizations*). Fail ops and Unknown reads are never listed. Each start value
//! comes with the ids of the ops that write it ([`StartValue::written_by`]).
//!
//! # Optimizations and why they are safe
//!
//! * **Dropping unobserved Unknown writes.** An Unknown write (Put, or CAS as far as its `new` value
//!   goes) whose value is *referenced* by no other op (as a read result, a Put's `previous`, a CAS's
//!   `expected` or `current`) is removed before the search, repeatedly until nothing changes.
//!   Proof: in any linearization, right after that write the register holds a value no op with a
//!   known result accepts, so the ops that follow until the value is overwritten can only be Unknown
//!   Puts (which overwrite it) and Unknown CASes whose `expected` differs (no-ops). Removing the write
//!   and those no-op CASes (allowed: Unknown ops may never happen and constrain nothing in real
//!   time) leaves a valid linearization. The argument compares values, not writers, so it holds
//!   when values repeat. The same rule prunes optional writes from windows.
//! * **Greedy state-preserving ops.** If a candidate with a known result would be accepted without
//!   changing the register (a read of the current value, a CAS that failed on it), it is linearized
//!   at once and no alternative is tried at that configuration. Proof: given any successful
//!   continuation, moving that op to the front keeps every op's input state unchanged and respects
//!   real time (it is a candidate now, so everything that had to precede it already did). This
//!   removes the `2^r` orders of `r` concurrent reads of the same value. The rule is not applied
//!   while an unlinearized Unknown op may write the current value (possible only when values
//!   repeat, e.g. "absent" after deletes): the op might be the one that observes that write later,
//!   and pulling it forward would hide a start value.
//! * **Unknown writes must be consumed.** An Unknown write is only linearized when a candidate with
//!   a known result (or an Unknown CAS that then applies) accepts the value it writes, and that op
//!   must come right after it; the flag in the cache key records this obligation. Proof: an Unknown
//!   op has no return, so it can always be moved later in a linearization; move it to just before
//!   the first op that depends on its value; if an overwrite or the end comes first, drop it as
//!   above. This stops pending Unknown writes from being tried in every combination.
//! * **Memoization** with a compact bitset (leading all-ones words are stored as a count), so a
//!   2,000-op history costs a few words per cached configuration.
//! * The window's start values are collected from the single exhaustive search that proved the
//!   violation, without a search per cut: each configuration it visits stands for the cuts `q` from
//!   one past the last register-changing op it contains (and, if that op was Unknown, one past the
//!   first known-result op after it) up to its first unlinearized return. The greedy rule keeps this
//!   exact because it only adds ops that do not change the register. A brute-force enumeration of
//!   the definitions above is cross-checked against the checker in the tests.
//!
//! # Search limit
//!
//! [`CheckOptions::max_states`] bounds the number of configurations one search may cache (default
//! [`DEFAULT_MAX_STATES`], 2 million; a configuration costs roughly 100 to 300 bytes and a few
//! microseconds in a debug build). The main search returns [`KeyVerdict::Inconclusive`] when it hits
//! the limit. The window shrinking has a separate budget of the same size; when it runs out, the
//! best window proven so far is reported with `minimal: false`. Histories with unique values
//! explore a few configurations per op; the limit matters for repeated values combined with many
//! concurrent Unknown writes, where the problem is exponential.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the history.
    pub id: usize,
    /// Client that ran it (each client runs one op at a time). Reported, not checked.
    pub process: usize,
    pub key: String,
    pub kind: OpKind,
    /// Nanoseconds, monotonic clock, taken before the request was sent.
    pub invoke: u64,
    /// When the answer arrived; `None` for Unknown outcomes (ignored for them if present).
    pub complete: Option<u64>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Linearizable get.
    Read,
    /// Unconditional write; an Ok answer reports the previous value.
    Put { value: String },
    /// Compare-and-set; `None` = key absent (as `new`: delete).
    Cas { expected: Option<String>, new: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It happened, with this result.
    Ok(OkResult),
    /// Definitely not applied (the server refused before acting).
    Fail,
    /// Timeout / connection lost / "may have been applied": may take effect at any time after
    /// invoke, or never.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OkResult {
    Read {
        value: Option<String>,
    },
    Put {
        previous: Option<String>,
    },
    /// When `succeeded`, `current == new`; when not, `current` is the value the CAS saw.
    Cas {
        succeeded: bool,
        current: Option<String>,
    },
}

/// Default for [`CheckOptions::max_states`].
pub const DEFAULT_MAX_STATES: u64 = 2_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Most configurations one search may visit (and cache) before giving up.
    pub max_states: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { max_states: DEFAULT_MAX_STATES }
    }
}

/// Verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyVerdict {
    Linearizable,
    /// Not linearizable; the window is the smallest self-contained proof (see the module docs).
    Violation(Window),
    /// The search limit was reached before an answer was found; `explored` configurations were
    /// visited.
    Inconclusive {
        explored: u64,
    },
    /// The history itself is malformed.
    InvalidHistory(HistoryError),
}

impl KeyVerdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, KeyVerdict::Linearizable)
    }

    pub fn window(&self) -> Option<&Window> {
        match self {
            KeyVerdict::Violation(w) => Some(w),
            _ => None,
        }
    }
}

/// Structural problems that make a history uncheckable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryError {
    CompleteBeforeInvoke {
        id: usize,
        invoke: u64,
        complete: u64,
    },
    /// An Ok op without a completion time.
    MissingCompletion {
        id: usize,
    },
    /// The result variant does not match the op kind (e.g. a Read with a Put result).
    ResultKindMismatch {
        id: usize,
    },
    DuplicateId {
        id: usize,
    },
    /// [`check_key`] was given ops of more than one key.
    KeyMismatch {
        id: usize,
        expected: String,
        found: String,
    },
    TooLarge {
        ops: usize,
    },
}

/// The smallest unexplainable window of a non-linearizable history (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub key: String,
    /// Id of the op whose answer is the first that no order explains (it ends the shortest
    /// non-linearizable prefix).
    pub culprit: usize,
    /// Absolute time (ns) of the window's first event; window op times are relative to it.
    pub start: u64,
    /// Register values possible at the window start.
    pub start_values: Vec<StartValue>,
    /// The window's ops, ordered by invoke time.
    pub ops: Vec<WindowOp>,
    /// False if the search limit stopped the shrinking (the window is then the whole prefix).
    pub minimal: bool,
}

impl Window {
    pub fn op_ids(&self) -> BTreeSet<usize> {
        self.ops.iter().map(|o| o.id).collect()
    }

    pub fn required_ids(&self) -> BTreeSet<usize> {
        self.ops.iter().filter(|o| o.role == Role::Required).map(|o| o.id).collect()
    }

    pub fn start_value_set(&self) -> BTreeSet<Option<String>> {
        self.start_values.iter().map(|s| s.value.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartValue {
    pub value: Option<String>,
    /// Ids of the ops (other than Fail ones) that write this value anywhere in the key's history.
    pub written_by: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowOp {
    pub id: usize,
    pub process: usize,
    pub role: Role,
    /// Nanoseconds relative to [`Window::start`] (negative: invoked before the window).
    pub invoke: i64,
    /// Relative completion; `None` for Unknown ops.
    pub complete: Option<i64>,
    pub kind: OpKind,
    pub outcome: Outcome,
}

/// How a window op may be placed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Invoked inside the window and returned by the culprit's return: must take effect inside.
    Required,
    /// Invoked before the window, returned inside: took effect inside the window or before it.
    MayPrecede,
    /// In flight at the culprit's return, Unknown, or demoted because the contradiction does not
    /// need it: may take effect inside the window (within its interval) or never.
    Optional,
}

/// Checks every key of a history independently (default options). Op ids are checked for
/// uniqueness within each key.
pub fn check(ops: &[Op]) -> BTreeMap<String, KeyVerdict> {
    check_with(ops, &CheckOptions::default())
}

pub fn check_with(ops: &[Op], options: &CheckOptions) -> BTreeMap<String, KeyVerdict> {
    let mut by_key: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.clone()).or_default().push(op.clone());
    }
    by_key.into_iter().map(|(key, ops)| (key, check_key_with(&ops, options))).collect()
}

/// Checks the ops of one key (in any order) with default options.
pub fn check_key(ops: &[Op]) -> KeyVerdict {
    check_key_with(ops, &CheckOptions::default())
}

pub fn check_key_with(ops: &[Op], options: &CheckOptions) -> KeyVerdict {
    let prep = match prepare(ops) {
        Ok(prep) => prep,
        Err(e) => return KeyVerdict::InvalidHistory(e),
    };
    let members: Vec<(u32, Role)> = prep
        .ops
        .iter()
        .enumerate()
        .map(|(i, o)| (i as u32, if o.ret_ev.is_some() { Role::Required } else { Role::Optional }))
        .collect();
    let main = build_problem(&prep, &members);
    let mut searcher = Searcher::new(&main, options.max_states, true);
    match searcher.run(ABSENT) {
        Err(Exhausted) => KeyVerdict::Inconclusive { explored: searcher.explored },
        Ok(true) => KeyVerdict::Linearizable,
        Ok(false) => {
            let records = searcher.records.take().unwrap_or_default();
            KeyVerdict::Violation(find_window(ops, &prep, records, options.max_states))
        }
    }
}

/// Lost-write check for the "set" workload: elements whose add was acknowledged but that are
/// missing from the final read.
pub fn lost_writes(acked: &BTreeSet<String>, present: &BTreeSet<String>) -> Vec<String> {
    acked.difference(present).cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// Values and effects
// ---------------------------------------------------------------------------------------------

/// Interned register value; 0 is "absent".
type Val = u32;
const ABSENT: Val = 0;
const NONE: u32 = u32::MAX;

#[derive(Default)]
struct Values {
    ids: HashMap<String, Val>,
    names: Vec<String>,
}

impl Values {
    fn intern(&mut self, value: Option<&String>) -> Val {
        let Some(s) = value else { return ABSENT };
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        self.names.push(s.clone());
        let id = self.names.len() as Val;
        self.ids.insert(s.clone(), id);
        id
    }

    fn name(&self, v: Val) -> Option<String> {
        if v == ABSENT { None } else { self.names.get(v as usize - 1).cloned() }
    }

    fn count(&self) -> usize {
        self.names.len() + 1
    }
}

/// An op as the model sees it. `None` observations mean "result unknown".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Read { value: Val },
    Put { value: Val, previous: Option<Val> },
    Cas { expected: Val, new: Val, observed: Option<(bool, Val)> },
}

impl Effect {
    /// The register value after this op if the model accepts it in state `s`. Unknown ops are only
    /// accepted when they change the register (otherwise linearizing them is the same as not).
    fn step(self, s: Val) -> Option<Val> {
        match self {
            Effect::Read { value } => (s == value).then_some(s),
            Effect::Put { value, previous: Some(p) } => (s == p).then_some(value),
            Effect::Put { value, previous: None } => (s != value).then_some(value),
            Effect::Cas { expected, new, observed: Some((succeeded, current)) } => {
                let (applies, next) = if s == expected { (true, new) } else { (false, s) };
                (succeeded == applies && current == next).then_some(next)
            }
            Effect::Cas { expected, new, observed: None } => (s == expected && new != s).then_some(new),
        }
    }

    /// True when the result is known (an Ok op).
    fn checked(self) -> bool {
        !matches!(self, Effect::Put { previous: None, .. } | Effect::Cas { observed: None, .. })
    }

    fn written(self) -> Option<Val> {
        match self {
            Effect::Read { .. } => None,
            Effect::Put { value, .. } => Some(value),
            Effect::Cas { new, .. } => Some(new),
        }
    }

    /// Values this op observes or requires.
    fn refs(self) -> [Option<Val>; 2] {
        match self {
            Effect::Read { value } => [Some(value), None],
            Effect::Put { previous, .. } => [previous, None],
            Effect::Cas { expected, observed, .. } => [Some(expected), observed.map(|o| o.1)],
        }
    }

    /// Accepting this op can never change the register.
    fn never_changes_register(self) -> bool {
        match self {
            Effect::Read { .. } | Effect::Cas { observed: Some((false, _)), .. } => true,
            Effect::Put { value, previous: Some(p) } => value == p,
            Effect::Cas { expected, new, observed: Some((true, _)) } => expected == new,
            Effect::Put { previous: None, .. } | Effect::Cas { observed: None, .. } => false,
        }
    }

    /// Whether this op, accepted in state `v`, depends on `v` (so it may follow an Unknown write).
    fn consumes(self, v: Val) -> bool {
        self.step(v).is_some() && !matches!(self, Effect::Put { previous: None, .. })
    }
}

/// Drops optional writers whose value no other kept op references, until nothing changes.
/// Returns the keep mask. See the module docs for the proof.
fn prune_unreferenced(effects: &[Effect], optional: &[bool], keep: &mut [bool]) {
    let mut counts: HashMap<Val, usize> = HashMap::new();
    for (e, _) in effects.iter().zip(keep.iter()).filter(|(_, k)| **k) {
        for r in e.refs().into_iter().flatten() {
            *counts.entry(r).or_default() += 1;
        }
    }
    loop {
        let mut changed = false;
        for ((e, opt), k) in effects.iter().zip(optional).zip(keep.iter_mut()) {
            let (true, true, Some(v)) = (*k, *opt, e.written()) else {
                continue;
            };
            let own = e.refs().into_iter().filter(|r| *r == Some(v)).count();
            if counts.get(&v).copied().unwrap_or(0) <= own {
                *k = false;
                changed = true;
                for r in e.refs().into_iter().flatten() {
                    if let Some(c) = counts.get_mut(&r) {
                        *c = c.saturating_sub(1);
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Preparation: validation, interning, dropping, event list
// ---------------------------------------------------------------------------------------------

struct PrepOp {
    src: usize,
    id: usize,
    /// Completion time, only for ops with a known result.
    complete: Option<u64>,
    effect: Effect,
    call_ev: u32,
    ret_ev: Option<u32>,
}

struct Prepared {
    key: String,
    /// Ordered by call event.
    ops: Vec<PrepOp>,
    /// Event times in event order.
    event_times: Vec<u64>,
    /// Op (index into `ops`) of each event.
    event_ops: Vec<u32>,
    values: Values,
    writers: HashMap<Val, Vec<usize>>,
}

fn validate(ops: &[Op]) -> Result<(), HistoryError> {
    if ops.len() > (u32::MAX / 4) as usize {
        return Err(HistoryError::TooLarge { ops: ops.len() });
    }
    let key = ops.first().map(|o| o.key.as_str()).unwrap_or_default();
    let mut ids = HashSet::new();
    for op in ops {
        if op.key != key {
            return Err(HistoryError::KeyMismatch { id: op.id, expected: key.to_string(), found: op.key.clone() });
        }
        if !ids.insert(op.id) {
            return Err(HistoryError::DuplicateId { id: op.id });
        }
        if let Some(complete) = op.complete
            && complete < op.invoke
        {
            return Err(HistoryError::CompleteBeforeInvoke { id: op.id, invoke: op.invoke, complete });
        }
        let kinds_match = matches!(
            (&op.kind, &op.outcome),
            (_, Outcome::Fail | Outcome::Unknown)
                | (OpKind::Read, Outcome::Ok(OkResult::Read { .. }))
                | (OpKind::Put { .. }, Outcome::Ok(OkResult::Put { .. }))
                | (OpKind::Cas { .. }, Outcome::Ok(OkResult::Cas { .. }))
        );
        if !kinds_match {
            return Err(HistoryError::ResultKindMismatch { id: op.id });
        }
        if matches!(op.outcome, Outcome::Ok(_)) && op.complete.is_none() {
            return Err(HistoryError::MissingCompletion { id: op.id });
        }
    }
    Ok(())
}

fn prepare(ops: &[Op]) -> Result<Prepared, HistoryError> {
    validate(ops)?;
    let mut values = Values::default();
    let mut writers: HashMap<Val, Vec<usize>> = HashMap::new();
    let mut raw: Vec<(usize, Effect)> = Vec::new();
    for (src, op) in ops.iter().enumerate() {
        let effect = match (&op.kind, &op.outcome) {
            (_, Outcome::Fail) | (OpKind::Read, Outcome::Unknown) => continue,
            (OpKind::Read, Outcome::Ok(OkResult::Read { value })) => {
                Effect::Read { value: values.intern(value.as_ref()) }
            }
            (OpKind::Put { value }, Outcome::Ok(OkResult::Put { previous })) => {
                Effect::Put { value: values.intern(Some(value)), previous: Some(values.intern(previous.as_ref())) }
            }
            (OpKind::Put { value }, Outcome::Unknown) => {
                Effect::Put { value: values.intern(Some(value)), previous: None }
            }
            (OpKind::Cas { expected, new }, Outcome::Ok(OkResult::Cas { succeeded, current })) => Effect::Cas {
                expected: values.intern(expected.as_ref()),
                new: values.intern(new.as_ref()),
                observed: Some((*succeeded, values.intern(current.as_ref()))),
            },
            (OpKind::Cas { expected, new }, Outcome::Unknown) => Effect::Cas {
                expected: values.intern(expected.as_ref()),
                new: values.intern(new.as_ref()),
                observed: None,
            },
            _ => return Err(HistoryError::ResultKindMismatch { id: op.id }),
        };
        if let Some(w) = effect.written() {
            writers.entry(w).or_default().push(op.id);
        }
        raw.push((src, effect));
    }

    let effects: Vec<Effect> = raw.iter().map(|r| r.1).collect();
    let optional: Vec<bool> = effects.iter().map(|e| !e.checked()).collect();
    let mut keep = vec![true; raw.len()];
    prune_unreferenced(&effects, &optional, &mut keep);
    let kept: Vec<(usize, Effect)> = raw.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect();

    // (time, is_return, id, index into `kept`): calls sort before returns at equal times.
    let mut events: Vec<(u64, bool, usize, usize)> = Vec::with_capacity(kept.len() * 2);
    for (i, &(src, effect)) in kept.iter().enumerate() {
        let op = &ops[src];
        events.push((op.invoke, false, op.id, i));
        if effect.checked()
            && let Some(c) = op.complete
        {
            events.push((c, true, op.id, i));
        }
    }
    events.sort_unstable();

    let mut call_ev = vec![0u32; kept.len()];
    let mut ret_ev = vec![None; kept.len()];
    let mut call_order = Vec::with_capacity(kept.len());
    for (ev, &(_, is_ret, _, i)) in events.iter().enumerate() {
        if is_ret {
            ret_ev[i] = Some(ev as u32);
        } else {
            call_ev[i] = ev as u32;
            call_order.push(i);
        }
    }
    let mut rank = vec![0u32; kept.len()];
    for (r, &i) in call_order.iter().enumerate() {
        rank[i] = r as u32;
    }
    let prep_ops = call_order
        .iter()
        .map(|&i| {
            let (src, effect) = kept[i];
            PrepOp {
                src,
                id: ops[src].id,
                complete: if effect.checked() { ops[src].complete } else { None },
                effect,
                call_ev: call_ev[i],
                ret_ev: ret_ev[i],
            }
        })
        .collect();
    Ok(Prepared {
        key: ops.first().map(|o| o.key.clone()).unwrap_or_default(),
        ops: prep_ops,
        event_times: events.iter().map(|e| e.0).collect(),
        event_ops: events.iter().map(|e| rank[e.3]).collect(),
        values,
        writers,
    })
}

// ---------------------------------------------------------------------------------------------
// Search problems
// ---------------------------------------------------------------------------------------------

struct POp {
    effect: Effect,
    role: Role,
    /// Global event index of the call (for the cut bookkeeping).
    call_ev: u32,
    call_entry: u32,
    /// `NONE` if the op has no return entry in this problem.
    ret_entry: u32,
}

#[derive(Clone, Copy)]
struct Entry {
    op: u32,
    is_call: bool,
    /// Global event index.
    ev: u32,
}

/// A set of ops with roles; entry 0 is the list head, entry `entries.len()` the tail.
struct Problem {
    ops: Vec<POp>,
    entries: Vec<Entry>,
    required: usize,
    /// For every value, the ops that reference it.
    consumers: Vec<Vec<u32>>,
    /// For every value, the Unknown ops that may write it.
    unknown_writers: Vec<Vec<u32>>,
}

/// `members` must be sorted by index into `prep.ops` (i.e. by call).
fn build_problem(prep: &Prepared, members: &[(u32, Role)]) -> Problem {
    let mut ops = Vec::with_capacity(members.len());
    let mut evs: Vec<Entry> = Vec::with_capacity(members.len() * 2);
    let mut consumers: Vec<Vec<u32>> = vec![Vec::new(); prep.values.count()];
    let mut unknown_writers: Vec<Vec<u32>> = vec![Vec::new(); prep.values.count()];
    for &(pi, role) in members {
        let Some(po) = prep.ops.get(pi as usize) else { continue };
        let local = ops.len() as u32;
        evs.push(Entry { op: local, is_call: true, ev: po.call_ev });
        if role != Role::Optional
            && let Some(r) = po.ret_ev
        {
            evs.push(Entry { op: local, is_call: false, ev: r });
        }
        let mut refs = po.effect.refs();
        if refs[0] == refs[1] {
            refs[1] = None;
        }
        for v in refs.into_iter().flatten() {
            if let Some(list) = consumers.get_mut(v as usize) {
                list.push(local);
            }
        }
        if !po.effect.checked()
            && let Some(list) = po.effect.written().and_then(|v| unknown_writers.get_mut(v as usize))
        {
            list.push(local);
        }
        ops.push(POp { effect: po.effect, role, call_ev: po.call_ev, call_entry: NONE, ret_entry: NONE });
    }
    evs.sort_unstable_by_key(|e| e.ev);
    let mut entries = Vec::with_capacity(evs.len() + 1);
    entries.push(Entry { op: NONE, is_call: false, ev: NONE });
    for e in evs {
        let idx = entries.len() as u32;
        let o = &mut ops[e.op as usize];
        if e.is_call {
            o.call_entry = idx;
        } else {
            o.ret_entry = idx;
        }
        entries.push(e);
    }
    let required = ops.iter().filter(|o| o.role == Role::Required && o.ret_entry != NONE).count();
    Problem { ops, entries, required, consumers, unknown_writers }
}

// ---------------------------------------------------------------------------------------------
// WGL search
// ---------------------------------------------------------------------------------------------

/// Small fast hasher (FxHash-style mixing, splitmix64 finish); keys are bitsets and small ints.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(buf));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        // splitmix64 finalizer: the table uses both the low and the high bits.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A configuration: linearized ops (bitset with leading all-ones words counted), register value,
/// and whether the last op was an Unknown write whose value must be consumed next.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    state: Val,
    consume: bool,
    full_words: u32,
    tail: Box<[u64]>,
}

/// A visited configuration, valid as "state before the window" for cuts `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    lo: u32,
    hi: u32,
    state: Val,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    /// One of several alternatives at its configuration.
    Branch,
    /// The only child of its configuration (greedy state-preserving op).
    Forced,
    /// A MayPrecede op left out of the window (it took effect before).
    Skip,
}

struct Frame {
    op: u32,
    kind: FrameKind,
    prev: Cursor,
}

#[derive(Clone, Copy)]
struct Cursor {
    state: Val,
    consume: bool,
    /// One past the last global call event of a register-changing op linearized so far.
    lo: u32,
    /// The last register-changing op was an Unknown one ...
    after_unknown: bool,
    /// ... and this is the earliest global call event of a known-result op linearized after it
    /// (`NONE` if none yet).
    known_after: u32,
    remaining: usize,
}

/// The search limit was reached.
struct Exhausted;

struct Searcher<'p> {
    p: &'p Problem,
    next: Vec<u32>,
    prev: Vec<u32>,
    /// List of return entries only.
    rnext: Vec<u32>,
    rprev: Vec<u32>,
    bits: Vec<u64>,
    cache: HashSet<Key, BuildHasherDefault<FxHasher>>,
    explored: u64,
    limit: u64,
    records: Option<Vec<Record>>,
}

fn unlink(next: &mut [u32], prev: &mut [u32], e: u32) {
    let (p, n) = (prev[e as usize], next[e as usize]);
    next[p as usize] = n;
    prev[n as usize] = p;
}

fn relink(next: &mut [u32], prev: &mut [u32], e: u32) {
    let (p, n) = (prev[e as usize], next[e as usize]);
    next[p as usize] = e;
    prev[n as usize] = e;
}

impl<'p> Searcher<'p> {
    fn new(p: &'p Problem, limit: u64, record: bool) -> Self {
        let slots = p.entries.len() + 1;
        Searcher {
            p,
            next: vec![0; slots],
            prev: vec![0; slots],
            rnext: vec![0; slots],
            rprev: vec![0; slots],
            bits: vec![0; p.ops.len().div_ceil(64)],
            cache: HashSet::default(),
            explored: 0,
            limit,
            records: record.then(Vec::new),
        }
    }

    fn tail(&self) -> u32 {
        self.p.entries.len() as u32
    }

    fn reset(&mut self) {
        let tail = self.tail();
        for i in 0..tail {
            self.next[i as usize] = i + 1;
            self.prev[i as usize + 1] = i;
        }
        let mut last = 0u32;
        for (i, e) in self.p.entries.iter().enumerate().skip(1) {
            if !e.is_call {
                self.rnext[last as usize] = i as u32;
                self.rprev[i] = last;
                last = i as u32;
            }
        }
        self.rnext[last as usize] = tail;
        self.rprev[tail as usize] = last;
        self.bits.fill(0);
    }

    fn bit(&self, op: u32) -> bool {
        self.bits[(op / 64) as usize] & (1u64 << (op % 64)) != 0
    }

    fn flip(&mut self, op: u32) {
        self.bits[(op / 64) as usize] ^= 1u64 << (op % 64);
    }

    fn lift(&mut self, op: u32) {
        let (c, r) = (self.p.ops[op as usize].call_entry, self.p.ops[op as usize].ret_entry);
        unlink(&mut self.next, &mut self.prev, c);
        if r != NONE {
            unlink(&mut self.next, &mut self.prev, r);
            unlink(&mut self.rnext, &mut self.rprev, r);
        }
    }

    fn unlift(&mut self, op: u32) {
        let (c, r) = (self.p.ops[op as usize].call_entry, self.p.ops[op as usize].ret_entry);
        if r != NONE {
            relink(&mut self.rnext, &mut self.rprev, r);
            relink(&mut self.next, &mut self.prev, r);
        }
        relink(&mut self.next, &mut self.prev, c);
    }

    /// First return entry still in the list (`tail` if none).
    fn first_return(&self) -> u32 {
        self.rnext[0]
    }

    fn key(&self, state: Val, consume: bool) -> Key {
        let full = self.bits.iter().take_while(|w| **w == u64::MAX).count();
        let end = self.bits.iter().rposition(|w| *w != 0).map_or(0, |i| i + 1).max(full);
        Key { state, consume, full_words: full as u32, tail: self.bits[full..end].into() }
    }

    /// Caches the current configuration; false if it was seen before.
    fn visit(&mut self, cur: &Cursor) -> Result<bool, Exhausted> {
        if !self.cache.insert(self.key(cur.state, cur.consume)) {
            return Ok(false);
        }
        self.explored += 1;
        if self.explored > self.limit {
            return Err(Exhausted);
        }
        // A configuration stands for the linearizations of the ops before a cut `q` obtained by
        // leaving out its register-preserving ops invoked at or after `q`. Such a linearization must
        // end with a known-result op (or be empty): if the last register change was an Unknown op,
        // some known-result op after it must be kept, i.e. invoked before `q`.
        let lo = if cur.after_unknown { cur.lo.max(cur.known_after.saturating_add(1)) } else { cur.lo };
        let ends_known = !cur.after_unknown || cur.known_after != NONE;
        if !cur.consume && ends_known {
            let fr = self.first_return();
            let hi = if fr == self.tail() { u32::MAX } else { self.p.entries[fr as usize].ev };
            if let Some(records) = &mut self.records {
                records.push(Record { lo, hi, state: cur.state });
            }
        }
        Ok(true)
    }

    /// A candidate with a known result that the model accepts without changing the register.
    /// None while an Unknown op that may still write the current value is pending: the op could
    /// then be the one observing that write later, which matters for the start values (with
    /// unique values this only happens for "absent").
    fn forced_candidate(&self, state: Val) -> Option<u32> {
        let pending_writer =
            self.p.unknown_writers.get(state as usize).is_some_and(|list| list.iter().any(|&w| !self.bit(w)));
        if pending_writer {
            return None;
        }
        let tail = self.tail();
        let mut e = self.next[0];
        while e != tail {
            let entry = self.p.entries[e as usize];
            if !entry.is_call {
                break;
            }
            let effect = self.p.ops[entry.op as usize].effect;
            if effect.checked() && effect.step(state) == Some(state) {
                return Some(entry.op);
            }
            e = self.next[e as usize];
        }
        None
    }

    /// Whether some candidate other than `except` consumes value `v`. Uses the value's list of
    /// referencing ops when it is short (unique values), else walks the candidates.
    fn has_consumer(&self, except: u32, v: Val) -> bool {
        let fr = self.first_return();
        let list = self.p.consumers.get(v as usize).map_or(&[][..], Vec::as_slice);
        if list.len() <= 16 {
            return list.iter().any(|&c| {
                let o = &self.p.ops[c as usize];
                c != except && !self.bit(c) && o.call_entry < fr && o.effect.consumes(v)
            });
        }
        let mut e = self.next[0];
        while e < fr {
            let entry = self.p.entries[e as usize];
            if entry.op != except && self.p.ops[entry.op as usize].effect.consumes(v) {
                return true;
            }
            e = self.next[e as usize];
        }
        false
    }

    /// The register value after linearizing candidate `op` now, if allowed.
    fn try_op(&self, cur: &Cursor, op: u32) -> Option<Val> {
        let effect = self.p.ops[op as usize].effect;
        let next = effect.step(cur.state)?;
        if effect.checked() {
            return Some(next);
        }
        if cur.consume && !effect.consumes(cur.state) {
            return None;
        }
        self.has_consumer(op, next).then_some(next)
    }

    /// Moves to the child configuration; false if it was already explored.
    fn advance(
        &mut self,
        cur: &mut Cursor,
        stack: &mut Vec<Frame>,
        op: u32,
        next: Val,
        kind: FrameKind,
    ) -> Result<bool, Exhausted> {
        let o = &self.p.ops[op as usize];
        let (effect, role, call_ev) = (o.effect, o.role, o.call_ev);
        let mut child = *cur;
        child.state = next;
        if kind != FrameKind::Skip {
            child.consume = !effect.checked();
            if next != cur.state {
                child.lo = child.lo.max(call_ev + 1);
                child.after_unknown = !effect.checked();
                child.known_after = NONE;
            } else if child.after_unknown {
                child.known_after = child.known_after.min(call_ev);
            }
            if role == Role::Required {
                child.remaining -= 1;
            }
        }
        self.flip(op);
        self.lift(op);
        if !self.visit(&child)? {
            self.unlift(op);
            self.flip(op);
            return Ok(false);
        }
        stack.push(Frame { op, kind, prev: *cur });
        *cur = child;
        Ok(true)
    }

    /// Pops to the most recent branching configuration; returns where its walk resumes.
    fn backtrack(&mut self, cur: &mut Cursor, stack: &mut Vec<Frame>) -> Option<u32> {
        while let Some(frame) = stack.pop() {
            self.unlift(frame.op);
            self.flip(frame.op);
            *cur = frame.prev;
            if frame.kind == FrameKind::Branch {
                return Some(self.next[self.p.ops[frame.op as usize].call_entry as usize]);
            }
        }
        None
    }

    /// Searches for an order of the problem's ops starting from register value `start`.
    /// `Ok(true)`: found; `Ok(false)`: none exists (or this start was already explored).
    fn run(&mut self, start: Val) -> Result<bool, Exhausted> {
        self.reset();
        let tail = self.tail();
        let mut cur = Cursor {
            state: start,
            consume: false,
            lo: 0,
            after_unknown: false,
            known_after: NONE,
            remaining: self.p.required,
        };
        if !self.visit(&cur)? {
            return Ok(false);
        }
        let mut stack: Vec<Frame> = Vec::new();
        let mut entry = self.next[0];
        let mut fresh = true;
        loop {
            if cur.remaining == 0 {
                return Ok(true);
            }
            if fresh {
                fresh = false;
                entry = self.next[0];
                if let Some(op) = self.forced_candidate(cur.state) {
                    let same = cur.state;
                    if self.advance(&mut cur, &mut stack, op, same, FrameKind::Forced)? {
                        fresh = true;
                    } else {
                        match self.backtrack(&mut cur, &mut stack) {
                            Some(e) => entry = e,
                            None => return Ok(false),
                        }
                    }
                    continue;
                }
            }
            let blocked = if entry == tail {
                true
            } else {
                let Entry { op, is_call, .. } = self.p.entries[entry as usize];
                if is_call {
                    if let Some(next) = self.try_op(&cur, op)
                        && self.advance(&mut cur, &mut stack, op, next, FrameKind::Branch)?
                    {
                        fresh = true;
                        continue;
                    }
                    entry = self.next[entry as usize];
                    false
                } else {
                    let skippable = self.p.ops[op as usize].role == Role::MayPrecede && !cur.consume;
                    let same = cur.state;
                    if skippable && self.advance(&mut cur, &mut stack, op, same, FrameKind::Skip)? {
                        fresh = true;
                        continue;
                    }
                    true
                }
            };
            if blocked {
                match self.backtrack(&mut cur, &mut stack) {
                    Some(e) => entry = e,
                    None => return Ok(false),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Window
// ---------------------------------------------------------------------------------------------

/// Merges records per register value into disjoint cut intervals.
fn merge_records(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_unstable_by_key(|r| (r.state, r.lo, r.hi));
    let mut merged: Vec<Record> = Vec::new();
    for r in records {
        match merged.last_mut() {
            Some(last) if last.state == r.state && r.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(r.hi),
            _ => merged.push(r),
        }
    }
    merged
}

fn start_values_at(intervals: &[Record], q: u32) -> Vec<Val> {
    intervals.iter().filter(|r| r.lo <= q && q <= r.hi && r.lo <= r.hi).map(|r| r.state).collect()
}

/// The window's ops for cut `q` and culprit return event `end`, minus ops that cannot matter, with
/// their search roles. `demoted` ops (indices into `prep.ops`) are searched like `MayPrecede` ones:
/// inside their interval or not at all.
fn window_members(prep: &Prepared, q: u32, end: u32, demoted: &BTreeSet<u32>) -> Vec<(u32, Role)> {
    let mut members = Vec::new();
    for (i, o) in prep.ops.iter().enumerate() {
        if o.call_ev > end {
            break;
        }
        let role = match o.ret_ev {
            Some(r) if r < q => continue,
            Some(r) if r <= end => {
                if o.call_ev >= q && !demoted.contains(&(i as u32)) {
                    Role::Required
                } else {
                    Role::MayPrecede
                }
            }
            _ => Role::Optional,
        };
        if role != Role::Required && o.effect.never_changes_register() {
            continue;
        }
        members.push((i as u32, role));
    }
    let effects: Vec<Effect> = members.iter().map(|&(i, _)| prep.ops[i as usize].effect).collect();
    let optional: Vec<bool> = members.iter().map(|&(_, r)| r != Role::Required).collect();
    let mut keep = vec![true; members.len()];
    prune_unreferenced(&effects, &optional, &mut keep);
    members.into_iter().zip(keep).filter_map(|(m, k)| k.then_some(m)).collect()
}

/// Whether no order of `members` explains them from any of the start values. Spends `budget`.
fn unexplainable(prep: &Prepared, members: &[(u32, Role)], sigma: &[Val], budget: &mut u64) -> Result<bool, Exhausted> {
    if sigma.is_empty() || !members.iter().any(|m| m.1 == Role::Required) {
        return Ok(false);
    }
    let problem = build_problem(prep, members);
    let mut searcher = Searcher::new(&problem, *budget, false);
    let mut result = Ok(true);
    for &s in sigma {
        match searcher.run(s) {
            Ok(false) => {}
            Ok(true) => {
                result = Ok(false);
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    *budget = budget.saturating_sub(searcher.explored);
    result
}

fn find_window(ops: &[Op], prep: &Prepared, records: Vec<Record>, budget: u64) -> Window {
    let last_event = (prep.event_times.len() as u32).saturating_sub(1);
    let end = records.iter().map(|r| r.hi).max().unwrap_or(last_event).min(last_event);
    let culprit_op = prep.event_ops.get(end as usize).copied().unwrap_or(NONE);
    let intervals = merge_records(records);
    let mut budget = budget;
    let mut minimal = true;
    let none = BTreeSet::new();

    // Latest cut whose window is unexplainable; the whole prefix (q = 0) is known to be.
    let mut cut = None;
    for q in (1..=end).rev() {
        let sigma = start_values_at(&intervals, q);
        match unexplainable(prep, &window_members(prep, q, end, &none), &sigma, &mut budget) {
            Ok(false) => {}
            Ok(true) => {
                cut = Some((q, sigma));
                break;
            }
            Err(Exhausted) => {
                minimal = false;
                break;
            }
        }
    }
    let (q, sigma) = cut.unwrap_or_else(|| {
        let sigma = start_values_at(&intervals, 0);
        (0, if sigma.is_empty() { vec![ABSENT] } else { sigma })
    });

    // Demote required ops other than the culprit, in invoke order, while it stays unexplainable.
    let mut demoted = BTreeSet::new();
    if minimal {
        let candidates: Vec<u32> = window_members(prep, q, end, &none)
            .into_iter()
            .filter(|&(i, role)| role == Role::Required && i != culprit_op)
            .map(|m| m.0)
            .collect();
        for c in candidates {
            demoted.insert(c);
            match unexplainable(prep, &window_members(prep, q, end, &demoted), &sigma, &mut budget) {
                Ok(true) => {}
                Ok(false) => {
                    demoted.remove(&c);
                }
                Err(Exhausted) => {
                    demoted.remove(&c);
                    minimal = false;
                    break;
                }
            }
        }
    }
    let members: Vec<(u32, Role)> = window_members(prep, q, end, &demoted)
        .into_iter()
        .map(|(i, role)| (i, if demoted.contains(&i) { Role::Optional } else { role }))
        .collect();

    let start = prep.event_times.get(q as usize).copied().unwrap_or(0);
    let culprit = prep.ops.get(culprit_op as usize).map_or(0, |o| o.id);
    let mut window_ops: Vec<WindowOp> = members
        .iter()
        .filter_map(|&(i, role)| {
            let po = prep.ops.get(i as usize)?;
            let op = ops.get(po.src)?;
            Some(WindowOp {
                id: op.id,
                process: op.process,
                role,
                invoke: relative(op.invoke, start),
                complete: po.complete.map(|c| relative(c, start)),
                kind: op.kind.clone(),
                outcome: op.outcome.clone(),
            })
        })
        .collect();
    window_ops.sort_by_key(|o| (o.invoke, o.id));
    let mut start_values: Vec<StartValue> = sigma
        .iter()
        .map(|&v| StartValue {
            value: prep.values.name(v),
            written_by: prep.writers.get(&v).cloned().unwrap_or_default(),
        })
        .collect();
    start_values.sort_by(|a, b| a.value.cmp(&b.value));
    Window { key: prep.key.clone(), culprit, start, start_values, ops: window_ops, minimal }
}

fn relative(t: u64, start: u64) -> i64 {
    if t >= start {
        i64::try_from(t - start).unwrap_or(i64::MAX)
    } else {
        i64::try_from(start - t).map_or(i64::MIN, |d| -d)
    }
}

// ---------------------------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------------------------

fn fmt_value(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "absent".to_string(),
    }
}

/// Signed nanoseconds as milliseconds with three decimals.
fn fmt_ms(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "+" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1_000_000, (abs % 1_000_000) / 1_000)
}

fn fmt_kind(kind: &OpKind) -> String {
    match kind {
        OpKind::Read => "read".to_string(),
        OpKind::Put { value } => format!("put {value:?}"),
        OpKind::Cas { expected, new } => format!("cas {} -> {}", fmt_value(expected), fmt_value(new)),
    }
}

fn fmt_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(OkResult::Read { value }) => format!("ok {}", fmt_value(value)),
        Outcome::Ok(OkResult::Put { previous }) => format!("ok, previous {}", fmt_value(previous)),
        Outcome::Ok(OkResult::Cas { succeeded: true, current }) => format!("ok, swapped, now {}", fmt_value(current)),
        Outcome::Ok(OkResult::Cas { succeeded: false, current }) => {
            format!("ok, not swapped, saw {}", fmt_value(current))
        }
        Outcome::Fail => "fail".to_string(),
        Outcome::Unknown => "unknown".to_string(),
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Role::Required => "required",
            Role::MayPrecede => "may-precede",
            Role::Optional => "optional",
        })
    }
}

impl fmt::Display for StartValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fmt_value(&self.value))?;
        let ids: Vec<String> = self.written_by.iter().map(|id| id.to_string()).collect();
        match (self.value.is_none(), ids.is_empty()) {
            (true, true) => write!(f, " (initial)"),
            (true, false) => write!(f, " (initial, or written by op {})", ids.join(", ")),
            (false, true) => write!(f, " (written by no op)"),
            (false, false) => write!(f, " (written by op {})", ids.join(", ")),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {:?}: not linearizable: no order of the {} op(s) below explains the result of op {} \
             (window starts at t={} ms{})",
            self.key,
            self.ops.len(),
            self.culprit,
            fmt_ms(i64::try_from(self.start).unwrap_or(i64::MAX)).trim_start_matches('+'),
            if self.minimal { "" } else { "; not shrunk: search limit reached" }
        )?;
        let values: Vec<String> = self.start_values.iter().map(|v| v.to_string()).collect();
        writeln!(f, "register values possible at window start: {}", values.join("; "))?;
        writeln!(
            f,
            "{:>8} {:>7}  {:<24} {:<11}  {:<28} result",
            "op", "process", "invoke..complete (ms)", "role", "operation"
        )?;
        for op in &self.ops {
            let complete = op.complete.map_or_else(|| "?".to_string(), fmt_ms);
            let interval = format!("{}..{}", fmt_ms(op.invoke), complete);
            writeln!(
                f,
                "{:>8} {:>7}  {:<24} {:<11}  {:<28} {}",
                op.id,
                op.process,
                interval,
                op.role,
                fmt_kind(&op.kind),
                fmt_outcome(&op.outcome)
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::CompleteBeforeInvoke { id, invoke, complete } => {
                write!(f, "op {id} completes at {complete} ns, before its invoke at {invoke} ns")
            }
            HistoryError::MissingCompletion { id } => write!(f, "op {id} is Ok but has no completion time"),
            HistoryError::ResultKindMismatch { id } => write!(f, "op {id} has a result of the wrong kind"),
            HistoryError::DuplicateId { id } => write!(f, "op id {id} appears more than once"),
            HistoryError::KeyMismatch { id, expected, found } => {
                write!(f, "op {id} is on key {found:?}, expected {expected:?}")
            }
            HistoryError::TooLarge { ops } => write!(f, "history of {ops} ops is too large"),
        }
    }
}

impl fmt::Display for KeyVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyVerdict::Linearizable => write!(f, "linearizable"),
            KeyVerdict::Violation(w) => write!(f, "{w}"),
            KeyVerdict::Inconclusive { explored } => {
                write!(f, "inconclusive: search limit reached after {explored} states")
            }
            KeyVerdict::InvalidHistory(e) => write!(f, "invalid history: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const MS: u64 = 1_000_000;

    fn sv(v: Option<&str>) -> Option<String> {
        v.map(str::to_string)
    }

    fn op(id: usize, process: usize, invoke_ms: u64, complete_ms: Option<u64>, kind: OpKind, outcome: Outcome) -> Op {
        Op {
            id,
            process,
            key: "k".to_string(),
            kind,
            invoke: invoke_ms * MS,
            complete: complete_ms.map(|c| c * MS),
            outcome,
        }
    }

    fn read(id: usize, p: usize, inv: u64, comp: u64, value: Option<&str>) -> Op {
        op(id, p, inv, Some(comp), OpKind::Read, Outcome::Ok(OkResult::Read { value: sv(value) }))
    }

    fn put(id: usize, p: usize, inv: u64, comp: u64, value: &str, previous: Option<&str>) -> Op {
        let kind = OpKind::Put { value: value.to_string() };
        op(id, p, inv, Some(comp), kind, Outcome::Ok(OkResult::Put { previous: sv(previous) }))
    }

    /// `swap` = (expected, new); `result` = (succeeded, current).
    fn cas(
        id: usize,
        p: usize,
        inv: u64,
        comp: u64,
        swap: (Option<&str>, Option<&str>),
        result: (bool, Option<&str>),
    ) -> Op {
        let kind = OpKind::Cas { expected: sv(swap.0), new: sv(swap.1) };
        op(id, p, inv, Some(comp), kind, Outcome::Ok(OkResult::Cas { succeeded: result.0, current: sv(result.1) }))
    }

    fn put_unknown(id: usize, p: usize, inv: u64, value: &str) -> Op {
        op(id, p, inv, None, OpKind::Put { value: value.to_string() }, Outcome::Unknown)
    }

    fn cas_unknown(id: usize, p: usize, inv: u64, expected: Option<&str>, new: Option<&str>) -> Op {
        op(id, p, inv, None, OpKind::Cas { expected: sv(expected), new: sv(new) }, Outcome::Unknown)
    }

    fn put_fail(id: usize, p: usize, inv: u64, comp: u64, value: &str) -> Op {
        op(id, p, inv, Some(comp), OpKind::Put { value: value.to_string() }, Outcome::Fail)
    }

    fn assert_linearizable(ops: &[Op]) {
        let verdict = check_key(ops);
        assert_eq!(verdict, KeyVerdict::Linearizable, "{verdict}");
    }

    fn violation(ops: &[Op]) -> Window {
        match check_key(ops) {
            KeyVerdict::Violation(w) => w,
            other => panic!("expected a violation, got: {other}"),
        }
    }

    fn set(ids: &[usize]) -> BTreeSet<usize> {
        ids.iter().copied().collect()
    }

    fn values(v: &[Option<&str>]) -> BTreeSet<Option<String>> {
        v.iter().map(|x| sv(*x)).collect()
    }

    /// Asserts culprit, required ops, all listed ops and start values of a window.
    fn assert_window(w: &Window, culprit: usize, required: &[usize], all: &[usize], start: &[Option<&str>]) {
        assert_eq!(w.culprit, culprit, "culprit\n{w}");
        assert_eq!(w.required_ids(), set(required), "required ops\n{w}");
        assert_eq!(w.op_ids(), set(all), "window ops\n{w}");
        assert_eq!(w.start_value_set(), values(start), "start values\n{w}");
        assert!(w.minimal, "{w}");
    }

    // ---------------------------------------------------------------------------------------
    // 1. Known-linearizable histories
    // ---------------------------------------------------------------------------------------

    #[test]
    fn sequential_history() {
        assert_linearizable(&[
            read(1, 1, 0, 1, None),
            put(2, 1, 2, 3, "a", None),
            read(3, 2, 4, 5, Some("a")),
            cas(4, 1, 6, 7, (Some("a"), Some("b")), (true, Some("b"))),
            cas(5, 2, 8, 9, (Some("a"), Some("c")), (false, Some("b"))),
            put(6, 1, 10, 11, "d", Some("b")),
            cas(7, 2, 12, 13, (Some("d"), None), (true, None)),
            read(8, 1, 14, 15, None),
        ]);
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(&[]);
    }

    #[test]
    fn concurrent_writes_reads_see_either_order() {
        // Both puts overlap; their `previous` results fix the order, and reads follow it.
        let a_then_b = [
            put(1, 1, 0, 10, "a", None),
            put(2, 2, 0, 10, "b", Some("a")),
            read(3, 3, 0, 10, Some("a")),
            read(4, 4, 0, 10, Some("b")),
            read(5, 3, 20, 30, Some("b")),
        ];
        assert_linearizable(&a_then_b);
        let b_then_a = [
            put(1, 1, 0, 10, "a", Some("b")),
            put(2, 2, 0, 10, "b", None),
            read(3, 3, 0, 10, Some("b")),
            read(4, 4, 0, 10, Some("a")),
            read(5, 3, 20, 30, Some("a")),
        ];
        assert_linearizable(&b_then_a);
    }

    #[test]
    fn read_concurrent_with_write_sees_old_or_new() {
        assert_linearizable(&[
            put(1, 1, 0, 5, "old", None),
            put(2, 1, 10, 20, "new", Some("old")),
            read(3, 2, 5, 25, Some("old")),
            read(4, 3, 5, 25, Some("new")),
            read(5, 4, 12, 15, Some("old")),
            read(6, 5, 12, 15, Some("new")),
        ]);
    }

    #[test]
    fn unknown_write_later_observed_is_linearized() {
        assert_linearizable(&[
            put(1, 1, 0, 5, "a", None),
            put_unknown(2, 2, 6, "b"),
            read(3, 3, 20, 30, Some("b")),
            put(4, 3, 40, 50, "c", Some("b")),
        ]);
    }

    #[test]
    fn unknown_write_never_observed_may_never_happen() {
        assert_linearizable(&[
            put_unknown(1, 1, 0, "a"),
            read(2, 2, 10, 20, None),
            read(3, 2, 30, 40, None),
            cas(4, 2, 50, 60, (None, Some("b")), (true, Some("b"))),
        ]);
    }

    #[test]
    fn unknown_write_may_take_effect_long_after_invoke() {
        // Invoked at 0, observed only after several other ops completed.
        assert_linearizable(&[
            put_unknown(1, 1, 0, "late"),
            put(2, 2, 10, 20, "x", None),
            read(3, 2, 30, 40, Some("x")),
            read(4, 2, 50, 60, Some("late")),
        ]);
    }

    #[test]
    fn unknown_cas_effect_observed() {
        assert_linearizable(&[
            put(1, 1, 0, 10, "a", None),
            cas_unknown(2, 2, 15, Some("a"), Some("b")),
            read(3, 3, 20, 30, Some("b")),
        ]);
    }

    #[test]
    fn failed_cas_consistent_with_concurrent_writes() {
        assert_linearizable(&[
            put(1, 1, 0, 10, "a", None),
            put(2, 1, 20, 40, "b", Some("a")),
            cas(3, 2, 25, 35, (Some("zz"), Some("y1")), (false, Some("a"))),
            cas(4, 3, 25, 35, (Some("zz"), Some("y2")), (false, Some("b"))),
            cas(5, 2, 45, 50, (None, Some("y3")), (false, Some("b"))),
        ]);
    }

    #[test]
    fn put_previous_values_chain() {
        // Puts 2 and 3 overlap; the chain of `previous` forces the order 1, 3, 2.
        assert_linearizable(&[
            put(1, 1, 0, 5, "a", None),
            put(2, 2, 10, 30, "b", Some("c")),
            put(3, 3, 15, 25, "c", Some("a")),
            put(4, 1, 40, 45, "d", Some("b")),
        ]);
    }

    #[test]
    fn fail_op_whose_value_is_never_seen() {
        assert_linearizable(&[
            put(1, 1, 0, 5, "a", None),
            put_fail(2, 2, 6, 8, "never"),
            read(3, 1, 10, 20, Some("a")),
            cas(4, 1, 21, 22, (Some("a"), Some("b")), (true, Some("b"))),
        ]);
    }

    #[test]
    fn unknown_reads_are_ignored() {
        assert_linearizable(&[
            put(1, 1, 0, 5, "a", None),
            op(2, 2, 1, None, OpKind::Read, Outcome::Unknown),
            read(3, 1, 10, 20, Some("a")),
        ]);
    }

    #[test]
    fn repeated_values_are_handled() {
        // Values are not unique here; the checker must still find the order.
        assert_linearizable(&[
            put(1, 1, 0, 10, "a", None),
            put(2, 2, 0, 10, "b", Some("a")),
            put(3, 3, 0, 10, "a", Some("b")),
            read(4, 4, 20, 30, Some("a")),
            put_unknown(5, 5, 31, "a"),
            put_unknown(6, 6, 31, "b"),
            read(7, 4, 40, 50, Some("b")),
            read(8, 4, 60, 70, Some("a")),
        ]);
    }

    #[test]
    fn equal_timestamps_count_as_concurrent() {
        // The read starts exactly when the put completes: either order is allowed.
        assert_linearizable(&[put(1, 1, 0, 10, "a", None), read(2, 2, 10, 20, None)]);
    }

    // ---------------------------------------------------------------------------------------
    // 2. Known-NOT-linearizable histories, with the exact window
    // ---------------------------------------------------------------------------------------

    #[test]
    fn stale_read_after_acknowledged_write() {
        let w = violation(&[put(1, 1, 0, 10, "a", None), read(2, 2, 20, 30, None)]);
        assert_window(&w, 2, &[2], &[2], &[Some("a")]);
        assert_eq!(w.start, 20 * MS);
    }

    #[test]
    fn stale_read_amid_concurrent_ops() {
        let w = violation(&[
            put(1, 1, 0, 10, "a", None),
            read(2, 2, 5, 25, Some("a")),
            put(3, 3, 12, 40, "b", Some("a")),
            read(4, 1, 30, 35, None),
            read(5, 2, 36, 50, Some("b")),
        ]);
        // Before op 4 the register is "a" or "b" (op 3 may already have happened); op 4 saw absent.
        assert_window(&w, 4, &[4], &[4], &[Some("a"), Some("b")]);
    }

    #[test]
    fn read_of_value_never_written() {
        let w = violation(&[put(1, 1, 0, 10, "a", None), read(2, 2, 20, 30, Some("ghost"))]);
        assert_window(&w, 2, &[2], &[2], &[Some("a")]);
    }

    #[test]
    fn reads_see_new_then_old() {
        let w = violation(&[
            put(1, 1, 0, 10, "a", None),
            put(2, 1, 20, 100, "b", Some("a")),
            read(3, 2, 30, 40, Some("b")),
            read(4, 2, 50, 60, Some("a")),
        ]);
        // Once op 3 saw "b", the register can only be "b"; op 4 then read "a".
        assert_window(&w, 4, &[4], &[4], &[Some("b")]);
    }

    #[test]
    fn put_previous_contradicts_completed_write() {
        let w = violation(&[put(1, 1, 0, 10, "a", None), put(2, 2, 20, 30, "b", None)]);
        assert_window(&w, 2, &[2], &[2], &[Some("a")]);
    }

    #[test]
    fn successful_cas_whose_expected_was_not_current() {
        let w = violation(&[put(1, 1, 0, 10, "a", None), cas(2, 2, 20, 30, (None, Some("b")), (true, Some("b")))]);
        assert_window(&w, 2, &[2], &[2], &[Some("a")]);
    }

    #[test]
    fn failed_cas_that_saw_its_expected_value() {
        let w =
            violation(&[put(1, 1, 0, 10, "a", None), cas(2, 2, 20, 30, (Some("a"), Some("b")), (false, Some("a")))]);
        assert_window(&w, 2, &[2], &[2], &[Some("a")]);
    }

    #[test]
    fn value_observed_that_only_a_failed_write_wrote() {
        let w = violation(&[put_fail(1, 1, 0, 10, "a"), read(2, 2, 20, 30, Some("a"))]);
        assert_window(&w, 2, &[2], &[2], &[None]);
        assert_eq!(w.start, 20 * MS);
    }

    #[test]
    fn unknown_write_observed_before_its_invoke() {
        let w = violation(&[read(1, 1, 0, 10, Some("a")), put_unknown(2, 2, 20, "a")]);
        assert_window(&w, 1, &[1], &[1], &[None]);
    }

    #[test]
    fn concurrent_puts_claiming_the_same_previous() {
        let w = violation(&[
            put(1, 1, 0, 10, "a", None),
            put(2, 2, 20, 50, "b", Some("a")),
            put(3, 3, 20, 50, "c", Some("a")),
        ]);
        // Ties at 50 are ordered by id, so op 3's answer is the first unexplained one.
        assert_window(&w, 3, &[2, 3], &[2, 3], &[Some("a")]);
        assert_eq!(w.start, 20 * MS);
    }

    #[test]
    fn unknown_writes_cannot_be_applied_twice() {
        // a, b, a would need two writes of "a"; the window needs all three reads and both writes.
        let w = violation(&[
            put_unknown(1, 1, 0, "a"),
            put_unknown(2, 2, 0, "b"),
            read(3, 3, 10, 20, Some("a")),
            read(4, 3, 30, 40, Some("b")),
            read(5, 3, 50, 60, Some("a")),
        ]);
        assert_window(&w, 5, &[3, 4, 5], &[1, 2, 3, 4, 5], &[None]);
        let roles: BTreeMap<usize, Role> = w.ops.iter().map(|o| (o.id, o.role)).collect();
        assert_eq!(roles.get(&1), Some(&Role::Optional));
        assert_eq!(w.start, 10 * MS);
        assert_eq!(w.ops.first().map(|o| o.invoke), Some(-10 * MS as i64));
    }

    #[test]
    fn straddling_write_may_precede_window() {
        // Op 2 straddles the window start; the window still needs op 2 and op 4 together.
        let w = violation(&[
            put(1, 1, 0, 5, "a", None),
            put(2, 2, 10, 30, "b", Some("a")),
            read(3, 3, 20, 40, Some("b")),
            read(4, 4, 35, 45, Some("a")),
        ]);
        assert_eq!(w.culprit, 4);
        assert!(w.required_ids().contains(&4), "{w}");
    }

    // ---------------------------------------------------------------------------------------
    // Inputs that are not verdicts
    // ---------------------------------------------------------------------------------------

    #[test]
    fn malformed_histories_are_reported() {
        let backwards = op(1, 1, 10, Some(5), OpKind::Read, Outcome::Ok(OkResult::Read { value: None }));
        assert_eq!(
            check_key(&[backwards]),
            KeyVerdict::InvalidHistory(HistoryError::CompleteBeforeInvoke { id: 1, invoke: 10 * MS, complete: 5 * MS })
        );
        let no_completion = op(2, 1, 10, None, OpKind::Read, Outcome::Ok(OkResult::Read { value: None }));
        assert_eq!(check_key(&[no_completion]), KeyVerdict::InvalidHistory(HistoryError::MissingCompletion { id: 2 }));
        let wrong_kind = op(3, 1, 0, Some(1), OpKind::Read, Outcome::Ok(OkResult::Put { previous: None }));
        assert_eq!(check_key(&[wrong_kind]), KeyVerdict::InvalidHistory(HistoryError::ResultKindMismatch { id: 3 }));
        let dup = [read(4, 1, 0, 1, None), read(4, 2, 0, 1, None)];
        assert_eq!(check_key(&dup), KeyVerdict::InvalidHistory(HistoryError::DuplicateId { id: 4 }));
        let mut other_key = read(6, 1, 0, 1, None);
        other_key.key = "other".to_string();
        let mixed = [read(5, 1, 0, 1, None), other_key];
        assert!(matches!(check_key(&mixed), KeyVerdict::InvalidHistory(HistoryError::KeyMismatch { id: 6, .. })));
        // A Fail op with bad times is still a malformed history.
        let bad_fail = op(7, 1, 10, Some(1), OpKind::Put { value: "x".into() }, Outcome::Fail);
        assert!(matches!(check_key(&[bad_fail]), KeyVerdict::InvalidHistory(_)));
    }

    #[test]
    fn search_limit_gives_inconclusive() {
        let ops = [put(1, 1, 0, 10, "a", None), read(2, 2, 0, 10, Some("a")), read(3, 2, 20, 30, Some("a"))];
        let verdict = check_key_with(&ops, &CheckOptions { max_states: 1 });
        assert!(matches!(verdict, KeyVerdict::Inconclusive { explored: 2 }), "{verdict}");
        assert!(verdict.to_string().contains("inconclusive"));
        assert_eq!(check_key_with(&ops, &CheckOptions { max_states: 100 }), KeyVerdict::Linearizable);
    }

    #[test]
    fn check_splits_by_key() {
        let mut ops = vec![put(1, 1, 0, 10, "a", None), read(2, 2, 20, 30, None)];
        for (i, o) in [put(3, 1, 0, 10, "x", None), read(4, 2, 20, 30, Some("x"))].into_iter().enumerate() {
            ops.push(Op { key: "good".to_string(), id: 3 + i, ..o });
        }
        let verdicts = check(&ops);
        assert_eq!(verdicts.len(), 2);
        assert_eq!(verdicts.get("good"), Some(&KeyVerdict::Linearizable));
        assert_eq!(verdicts.get("k").and_then(KeyVerdict::window).map(|w| w.culprit), Some(2));
    }

    #[test]
    fn lost_writes_lists_acked_but_missing() {
        let acked: BTreeSet<String> = ["1", "2", "3"].iter().map(|s| s.to_string()).collect();
        let present: BTreeSet<String> = ["1", "3", "4"].iter().map(|s| s.to_string()).collect();
        assert_eq!(lost_writes(&acked, &present), vec!["2".to_string()]);
    }

    #[test]
    fn json_round_trip() {
        let ops = vec![put(1, 1, 0, 10, "a", None), read(2, 2, 20, 30, None), cas_unknown(3, 3, 1, None, Some("z"))];
        let json = serde_json::to_string(&ops).expect("serialize ops");
        let back: Vec<Op> = serde_json::from_str(&json).expect("deserialize ops");
        assert_eq!(back, ops);
        let verdict = check_key(&back);
        let json = serde_json::to_string(&verdict).expect("serialize verdict");
        let back: KeyVerdict = serde_json::from_str(&json).expect("deserialize verdict");
        assert_eq!(back, verdict);
    }

    // ---------------------------------------------------------------------------------------
    // 4. Display
    // ---------------------------------------------------------------------------------------

    #[test]
    fn window_display_lists_ops_and_values() {
        let w = violation(&[
            put_unknown(11, 1, 0, "apple"),
            put_unknown(12, 2, 0, "banana"),
            read(13, 3, 10, 20, Some("apple")),
            read(14, 3, 30, 40, Some("banana")),
            read(15, 3, 50, 60, Some("apple")),
        ]);
        let text = KeyVerdict::Violation(w.clone()).to_string();
        println!("{text}");
        for id in w.op_ids() {
            assert!(text.contains(&format!(" {id} ")), "missing op {id}:\n{text}");
        }
        for needle in ["\"apple\"", "\"banana\"", "absent (initial)", "op 15", "required", "optional", "-10.000..?"] {
            assert!(text.contains(needle), "missing {needle:?}:\n{text}");
        }
        let lines = text.lines().count();
        assert_eq!(lines, 3 + w.ops.len(), "{text}");
        let stale = violation(&[put(1, 1, 0, 10, "a", None), read(2, 2, 20, 30, None)]).to_string();
        println!("{stale}");
        assert!(stale.contains("\"a\" (written by op 1)") && stale.contains("+0.000..+10.000"), "{stale}");
    }

    // ---------------------------------------------------------------------------------------
    // 3. Randomized histories from a real register model
    // ---------------------------------------------------------------------------------------

    /// xorshift64*; deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
        fn pct(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
        fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
            items.get(self.below(items.len() as u64) as usize).cloned()
        }
    }

    #[derive(Clone, Copy)]
    struct GenCfg {
        ops: usize,
        procs: usize,
        read_pct: u64,
        /// Share of writes that are CASes (the rest are Puts).
        cas_pct: u64,
        /// Share of writes whose answer is lost (half of them took effect).
        unknown_pct: u64,
        /// Share of the remaining writes that are refused (never took effect).
        fail_pct: u64,
        unknown_read_pct: u64,
        /// Share of CASes that delete.
        delete_pct: u64,
        /// `Some(n)`: values drawn from n names (repeats); `None`: unique values.
        value_pool: Option<u64>,
    }

    const BASE: GenCfg = GenCfg {
        ops: 400,
        procs: 8,
        read_pct: 50,
        cas_pct: 40,
        unknown_pct: 6,
        fail_pct: 5,
        unknown_read_pct: 3,
        delete_pct: 5,
        value_pool: None,
    };

    #[derive(Clone, Copy, PartialEq)]
    enum Fate {
        Ok,
        UnknownApplied,
        UnknownLost,
        Fail,
    }

    struct Plan {
        process: usize,
        invoke: u64,
        complete: u64,
        point: u64,
        is_read: bool,
        is_cas: bool,
        fate: Fate,
    }

    /// Clients run ops back to back; each op takes effect at a random point inside its interval
    /// (Unknown ones possibly long after), and results come from a real register applied in
    /// point order, so the history is linearizable by construction.
    fn generate(seed: u64, cfg: GenCfg) -> Vec<Op> {
        let mut rng = Rng::new(seed);
        let mut clocks: Vec<u64> = (0..cfg.procs).map(|_| rng.below(1_000) * 1_000).collect();
        let mut plans = Vec::with_capacity(cfg.ops);
        for _ in 0..cfg.ops {
            let process = (0..cfg.procs).min_by_key(|&p| (clocks[p], p)).unwrap_or(0);
            let invoke = clocks[process] + rng.below(200) * 1_000;
            let duration = (50 + rng.below(2_000)) * 1_000;
            let complete = invoke + duration;
            clocks[process] = complete;
            let is_read = rng.pct(cfg.read_pct);
            let is_cas = !is_read && rng.pct(cfg.cas_pct);
            let fate = if is_read {
                if rng.pct(cfg.unknown_read_pct) { Fate::UnknownLost } else { Fate::Ok }
            } else if rng.pct(cfg.unknown_pct) {
                if rng.pct(50) { Fate::UnknownApplied } else { Fate::UnknownLost }
            } else if rng.pct(cfg.fail_pct) {
                Fate::Fail
            } else {
                Fate::Ok
            };
            let point = match fate {
                Fate::UnknownApplied => invoke + rng.below(3 * duration + 1),
                _ => invoke + rng.below(duration + 1),
            };
            plans.push(Plan { process, invoke, complete, point, is_read, is_cas, fate });
        }
        let mut counter = 0u64;
        let mut fresh = |rng: &mut Rng| {
            counter += 1;
            match cfg.value_pool {
                Some(n) => format!("x{}", rng.below(n)),
                None => format!("v{counter}"),
            }
        };
        let mut order: Vec<usize> =
            (0..plans.len()).filter(|&i| matches!(plans[i].fate, Fate::Ok | Fate::UnknownApplied)).collect();
        order.sort_by_key(|&i| (plans[i].point, i));
        let mut state: Option<String> = None;
        let mut seen: Vec<Option<String>> = vec![None];
        let mut built: Vec<Option<(OpKind, Outcome)>> = vec![None; plans.len()];
        for &i in &order {
            let p = &plans[i];
            let (kind, result) = if p.is_read {
                (OpKind::Read, OkResult::Read { value: state.clone() })
            } else if p.is_cas {
                let expected = if rng.pct(60) { state.clone() } else { rng.pick(&seen).flatten() };
                let new = if rng.pct(cfg.delete_pct) { None } else { Some(fresh(&mut rng)) };
                let succeeded = expected == state;
                if succeeded {
                    state = new.clone();
                }
                seen.push(new.clone());
                (OpKind::Cas { expected, new }, OkResult::Cas { succeeded, current: state.clone() })
            } else {
                let value = fresh(&mut rng);
                seen.push(Some(value.clone()));
                let previous = state.replace(value.clone());
                (OpKind::Put { value }, OkResult::Put { previous })
            };
            let outcome = if p.fate == Fate::Ok { Outcome::Ok(result) } else { Outcome::Unknown };
            built[i] = Some((kind, outcome));
        }
        plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (kind, outcome) = built[i].clone().unwrap_or_else(|| {
                    let kind = if p.is_read {
                        OpKind::Read
                    } else if p.is_cas {
                        OpKind::Cas { expected: rng.pick(&seen).flatten(), new: Some(fresh(&mut rng)) }
                    } else {
                        OpKind::Put { value: fresh(&mut rng) }
                    };
                    (kind, if p.fate == Fate::Fail { Outcome::Fail } else { Outcome::Unknown })
                });
                let complete = matches!(p.fate, Fate::Ok | Fate::Fail).then_some(p.complete);
                Op { id: i, process: p.process, key: "k".to_string(), kind, invoke: p.invoke, complete, outcome }
            })
            .collect()
    }

    /// The value an acknowledged write replaced (for a Put: `previous`; for a successful CAS:
    /// `expected`).
    fn replaced_value(op: &Op) -> Option<Option<String>> {
        match (&op.kind, &op.outcome) {
            (OpKind::Put { .. }, Outcome::Ok(OkResult::Put { previous })) => Some(previous.clone()),
            (OpKind::Cas { expected, .. }, Outcome::Ok(OkResult::Cas { succeeded: true, .. })) => {
                Some(expected.clone())
            }
            _ => None,
        }
    }

    /// Makes an acknowledged read R return the value that the latest write W acknowledged before
    /// R's invoke had replaced. Provably not linearizable with unique non-absent values: W saw
    /// that value, so its only writer precedes W, and R (after W in real time) cannot see it
    /// again. Candidate reads are tried from `permille` of the way through the history. Returns the
    /// mutated history and R's id.
    fn stale_read_mutation(ops: &[Op], permille: u64) -> Option<(Vec<Op>, usize)> {
        let reads: Vec<usize> =
            (0..ops.len()).filter(|&i| matches!(ops[i].outcome, Outcome::Ok(OkResult::Read { .. }))).collect();
        let offset = (reads.len() as u64 * permille.min(999) / 1000) as usize;
        for k in 0..reads.len() {
            let r = reads[(k + offset) % reads.len()];
            let latest = ops
                .iter()
                .filter(|w| replaced_value(w).is_some() && w.complete.is_some_and(|c| c < ops[r].invoke))
                .max_by_key(|w| w.complete);
            let Some(stale) = latest.and_then(replaced_value) else {
                continue;
            };
            if stale.is_none() || ops[r].outcome == Outcome::Ok(OkResult::Read { value: stale.clone() }) {
                continue;
            }
            let mut mutated = ops.to_vec();
            mutated[r].outcome = Outcome::Ok(OkResult::Read { value: stale });
            return Some((mutated, ops[r].id));
        }
        None
    }

    fn assert_culprit_window(ops: &[Op], culprit: usize, what: &str) {
        match check_key(ops) {
            KeyVerdict::Violation(w) => {
                assert_eq!(w.culprit, culprit, "{what}\n{w}");
                assert!(w.required_ids().contains(&culprit), "{what}\n{w}");
                assert!(w.minimal, "{what}\n{w}");
            }
            other => panic!("{what}: expected a violation, got {other}"),
        }
    }

    #[test]
    fn random_model_histories_are_linearizable_and_mutations_are_caught() {
        let mut rng = Rng::new(7);
        let mut mutated_count = 0;
        for seed in 1..=30u64 {
            let cfg = GenCfg { procs: 3 + (seed as usize % 10), ..BASE };
            let ops = generate(seed, cfg);
            let verdict = check_key(&ops);
            assert_eq!(verdict, KeyVerdict::Linearizable, "seed {seed}: {verdict}");
            let at = rng.below(1000);
            let (mutated, culprit) = stale_read_mutation(&ops, at).expect("a read after an acknowledged write");
            assert_culprit_window(&mutated, culprit, &format!("seed {seed} stale read"));
            mutated_count += 1;
        }
        assert_eq!(mutated_count, 30);
    }

    #[test]
    fn random_histories_with_repeated_values() {
        for seed in 100..=115u64 {
            let cfg = GenCfg { ops: 250, procs: 2 + (seed as usize % 6), value_pool: Some(3), ..BASE };
            let ops = generate(seed, cfg);
            let verdict = check_key(&ops);
            assert_eq!(verdict, KeyVerdict::Linearizable, "seed {seed}: {verdict}");
            // A read of a value nobody wrote is a violation whatever the rest does.
            let r = ops.iter().rposition(|o| matches!(o.outcome, Outcome::Ok(OkResult::Read { .. }))).expect("a read");
            let mut mutated = ops.clone();
            mutated[r].outcome = Outcome::Ok(OkResult::Read { value: Some("phantom".to_string()) });
            assert_culprit_window(&mutated, mutated[r].id, &format!("seed {seed} phantom read"));
        }
    }

    // ---------------------------------------------------------------------------------------
    // Brute-force cross-check of verdicts and windows on tiny random histories
    // ---------------------------------------------------------------------------------------

    #[derive(Clone)]
    struct BfOp {
        id: usize,
        call: usize,
        /// A return that constrains real time (None: may be ordered after anything).
        ret: Option<usize>,
        required: bool,
        kind: OpKind,
        result: Option<OkResult>,
    }

    fn bf_step(state: &Option<String>, kind: &OpKind, result: &Option<OkResult>) -> Option<Option<String>> {
        match (kind, result) {
            (OpKind::Read, Some(OkResult::Read { value })) => (value == state).then(|| state.clone()),
            (OpKind::Read, None) => Some(state.clone()),
            (OpKind::Put { value }, Some(OkResult::Put { previous })) => {
                (previous == state).then(|| Some(value.clone()))
            }
            (OpKind::Put { value }, None) => Some(Some(value.clone())),
            (OpKind::Cas { expected, new }, r) => {
                let applies = expected == state;
                let next = if applies { new.clone() } else { state.clone() };
                match r {
                    Some(OkResult::Cas { succeeded, current }) => {
                        (*succeeded == applies && *current == next).then_some(next)
                    }
                    None => Some(next),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Enumerates every sequence of distinct ops that respects real time and the model; calls
    /// `visit(state, last_result_known)` for each one containing all required ops (the empty
    /// sequence counts as "known"). Stops when `visit` returns true.
    fn bf_search(ops: &[BfOp], start: &Option<String>, visit: &mut dyn FnMut(&Option<String>, bool) -> bool) -> bool {
        fn rec(
            ops: &[BfOp],
            placed: &mut Vec<usize>,
            state: &Option<String>,
            known: bool,
            visit: &mut dyn FnMut(&Option<String>, bool) -> bool,
        ) -> bool {
            let complete = ops.iter().enumerate().all(|(i, o)| !o.required || placed.contains(&i));
            if complete && visit(state, known) {
                return true;
            }
            for (x, o) in ops.iter().enumerate() {
                if placed.contains(&x) {
                    continue;
                }
                if let Some(r) = o.ret
                    && placed.iter().any(|&b| r < ops[b].call)
                {
                    continue;
                }
                let Some(next) = bf_step(state, &o.kind, &o.result) else {
                    continue;
                };
                placed.push(x);
                let stop = rec(ops, placed, &next, o.result.is_some(), visit);
                placed.pop();
                if stop {
                    return true;
                }
            }
            false
        }
        rec(ops, &mut Vec::new(), start, true, visit)
    }

    fn bf_any(ops: &[BfOp], start: &Option<String>) -> bool {
        bf_search(ops, start, &mut |_, _| true)
    }

    fn ok_result(op: &Op) -> Option<OkResult> {
        match &op.outcome {
            Outcome::Ok(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Ops that can matter at all: no Fail ops, no Unknown reads.
    fn active(ops: &[Op]) -> Vec<Op> {
        ops.iter()
            .filter(|o| match o.outcome {
                Outcome::Fail => false,
                Outcome::Unknown => o.kind != OpKind::Read,
                Outcome::Ok(_) => true,
            })
            .cloned()
            .collect()
    }

    /// Events (time, is_return, id) sorted with calls before returns at equal times and ties by id,
    /// and per op id its (call, return) event indices.
    type BfEvents = (Vec<(u64, bool, usize)>, BTreeMap<usize, (usize, Option<usize>)>);

    fn bf_events(ops: &[Op]) -> BfEvents {
        let mut evs = Vec::new();
        for o in ops {
            evs.push((o.invoke, false, o.id));
            if let (Outcome::Ok(_), Some(c)) = (&o.outcome, o.complete) {
                evs.push((c, true, o.id));
            }
        }
        evs.sort();
        let mut idx: BTreeMap<usize, (usize, Option<usize>)> = BTreeMap::new();
        for (i, e) in evs.iter().enumerate() {
            let slot = idx.entry(e.2).or_insert((0, None));
            if e.1 {
                slot.1 = Some(i);
            } else {
                slot.0 = i;
            }
        }
        (evs, idx)
    }

    fn bf_linearizable(ops: &[Op]) -> bool {
        let ops = active(ops);
        let (_, idx) = bf_events(&ops);
        let bf: Vec<BfOp> = ops
            .iter()
            .map(|o| {
                let (call, ret) = idx[&o.id];
                BfOp { id: o.id, call, ret, required: ret.is_some(), kind: o.kind.clone(), result: ok_result(o) }
            })
            .collect();
        bf_any(&bf, &None)
    }

    /// The drop rule for unreferenced Unknown writes, written independently.
    fn bf_drop_unreferenced(mut ops: Vec<Op>) -> Vec<Op> {
        fn refs(o: &Op) -> Vec<Option<String>> {
            let mut r = Vec::new();
            match (&o.kind, &o.outcome) {
                (_, Outcome::Ok(OkResult::Read { value })) => r.push(value.clone()),
                (_, Outcome::Ok(OkResult::Put { previous })) => r.push(previous.clone()),
                _ => {}
            }
            if let OpKind::Cas { expected, .. } = &o.kind {
                r.push(expected.clone());
            }
            if let Outcome::Ok(OkResult::Cas { current, .. }) = &o.outcome {
                r.push(current.clone());
            }
            r
        }
        loop {
            let before = ops.len();
            let all: Vec<Vec<Option<String>>> = ops.iter().map(refs).collect();
            let droppable = |i: usize, o: &Op| {
                let written = match (&o.kind, &o.outcome) {
                    (OpKind::Put { value }, Outcome::Unknown) => Some(Some(value.clone())),
                    (OpKind::Cas { new, .. }, Outcome::Unknown) => Some(new.clone()),
                    _ => return false,
                };
                let Some(v) = written else { return false };
                !all.iter().enumerate().any(|(j, r)| j != i && r.contains(&v))
            };
            let keep: Vec<bool> = ops.iter().enumerate().map(|(i, o)| !droppable(i, o)).collect();
            // Drop one at a time so references from dropped ops vanish before the next decision.
            if let Some(first) = keep.iter().position(|k| !k) {
                ops.remove(first);
            }
            if ops.len() == before {
                return ops;
            }
        }
    }

    struct BfWindow {
        culprit: usize,
        start: u64,
        required: BTreeSet<usize>,
        all: BTreeSet<usize>,
        sigma: BTreeSet<Option<String>>,
    }

    /// The window definition of the module docs, evaluated by brute force.
    fn bf_window(raw: &[Op]) -> Option<BfWindow> {
        let ops = bf_drop_unreferenced(active(raw));
        let (evs, idx) = bf_events(&ops);
        let before = |q: usize| -> Vec<BfOp> {
            ops.iter()
                .filter(|o| idx[&o.id].0 < q)
                .map(|o| {
                    let (call, ret) = idx[&o.id];
                    let required = ret.is_some_and(|r| r < q);
                    let ret = if required { ret } else { None };
                    BfOp { id: o.id, call, ret, required, kind: o.kind.clone(), result: ok_result(o) }
                })
                .collect()
        };
        let end = (0..evs.len()).find(|&i| evs[i].1 && !bf_any(&before(i + 1), &None))?;
        for q in (0..=end).rev() {
            let mut sigma = BTreeSet::new();
            bf_search(&before(q), &None, &mut |s, known| {
                if known {
                    sigma.insert(s.clone());
                }
                false
            });
            if sigma.is_empty() {
                continue;
            }
            let window: Vec<BfOp> = ops
                .iter()
                .filter_map(|o| {
                    let (call, ret) = idx[&o.id];
                    if call > end || ret.is_some_and(|r| r < q) {
                        return None;
                    }
                    let returns_inside = ret.is_some_and(|r| r <= end);
                    let required = returns_inside && call >= q;
                    let ret = if returns_inside { ret } else { None };
                    Some(BfOp { id: o.id, call, ret, required, kind: o.kind.clone(), result: ok_result(o) })
                })
                .collect();
            if !sigma.iter().any(|s| bf_any(&window, s)) {
                // Demote required ops (not the culprit) in invoke order while still unexplainable.
                let mut window = window;
                let mut order: Vec<usize> =
                    (0..window.len()).filter(|&i| window[i].required && window[i].id != evs[end].2).collect();
                order.sort_by_key(|&i| window[i].call);
                for i in order {
                    window[i].required = false;
                    if sigma.iter().any(|s| bf_any(&window, s)) {
                        window[i].required = true;
                    }
                }
                return Some(BfWindow {
                    culprit: evs[end].2,
                    start: evs[q].0,
                    required: window.iter().filter(|o| o.required).map(|o| o.id).collect(),
                    all: window.iter().map(|o| o.id).collect(),
                    sigma,
                });
            }
        }
        panic!("the culprit's whole prefix must be unexplainable");
    }

    fn tiny_history(rng: &mut Rng, max_ops: u64) -> Vec<Op> {
        let pool = [None, Some("a".to_string()), Some("b".to_string())];
        let n = 2 + rng.below(max_ops.saturating_sub(1)) as usize;
        // Half the histories are highly concurrent with many Unknown ops.
        let (spread, length, ok_pct, unknown_pct) = if rng.pct(50) { (8, 5, 65, 20) } else { (4, 9, 50, 35) };
        (0..n)
            .map(|id| {
                let val = |rng: &mut Rng| rng.pick(&pool).flatten();
                let invoke = rng.below(spread);
                let complete = invoke + rng.below(length);
                let (kind, result) = match rng.below(3) {
                    0 => (OpKind::Read, OkResult::Read { value: val(rng) }),
                    1 => {
                        let value = if rng.pct(50) { "a" } else { "b" }.to_string();
                        (OpKind::Put { value }, OkResult::Put { previous: val(rng) })
                    }
                    _ => {
                        let (expected, new) = (val(rng), val(rng));
                        let succeeded = rng.pct(50);
                        let current = if succeeded && rng.pct(85) { new.clone() } else { val(rng) };
                        (OpKind::Cas { expected, new }, OkResult::Cas { succeeded, current })
                    }
                };
                let roll = rng.below(100);
                let (outcome, complete) = if roll < ok_pct {
                    (Outcome::Ok(result), Some(complete))
                } else if roll < ok_pct + unknown_pct {
                    // Unknown ops sometimes carry the time the client gave up; it must be ignored.
                    (Outcome::Unknown, rng.pct(20).then_some(complete))
                } else {
                    (Outcome::Fail, Some(complete))
                };
                Op { id, process: id, key: "k".to_string(), kind, invoke, complete, outcome }
            })
            .collect()
    }

    #[test]
    fn brute_force_cross_check() {
        // LINCHECK_BF_CASES / LINCHECK_BF_SEED / LINCHECK_BF_MAX_OPS widen the search when run by hand.
        let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let mut rng = Rng::new(env("LINCHECK_BF_SEED", 2024));
        let (mut linearizable, mut violations, mut multi_op_windows) = (0, 0, 0);
        for case in 0..env("LINCHECK_BF_CASES", 4000) {
            let ops = tiny_history(&mut rng, env("LINCHECK_BF_MAX_OPS", 7));
            let expected = bf_linearizable(&ops);
            let bf = bf_window(&ops);
            assert_eq!(expected, bf.is_none(), "case {case}: prefix definition disagrees with the verdict\n{ops:#?}");
            match (check_key(&ops), bf) {
                (KeyVerdict::Linearizable, None) => linearizable += 1,
                (KeyVerdict::Violation(w), Some(bf)) => {
                    violations += 1;
                    let ctx = format!("case {case}\n{w}\n{ops:#?}");
                    assert_eq!(w.culprit, bf.culprit, "culprit: {ctx}");
                    assert_eq!(w.start, bf.start, "start: {ctx}");
                    assert_eq!(w.required_ids(), bf.required, "required: {ctx}");
                    assert_eq!(w.start_value_set(), bf.sigma, "start values: {ctx}");
                    assert!(w.op_ids().is_subset(&bf.all), "listed ops: {ctx}");
                    assert!(w.minimal, "{ctx}");
                    if bf.required.len() > 1 {
                        multi_op_windows += 1;
                    }
                }
                (verdict, bf) => {
                    panic!("case {case}: checker says {verdict}, brute force linearizable={}", bf.is_none())
                }
            }
        }
        println!(
            "brute force: {linearizable} linearizable, {violations} violations ({multi_op_windows} multi-op windows)"
        );
        assert!(linearizable > 500 && violations > 500 && multi_op_windows > 50);
    }

    // ---------------------------------------------------------------------------------------
    // Performance (prints timings; asserts only verdicts)
    // ---------------------------------------------------------------------------------------

    #[test]
    fn perf_typical_histories() {
        let cases = [
            ("500 ops, 5 clients", GenCfg { ops: 500, procs: 5, unknown_pct: 6, ..BASE }),
            ("1000 ops, 8 clients", GenCfg { ops: 1_000, procs: 8, unknown_pct: 4, ..BASE }),
            ("2000 ops, 12 clients", GenCfg { ops: 2_000, procs: 12, unknown_pct: 3, ..BASE }),
            (
                "2000 ops, 12 clients, 80% reads",
                GenCfg { ops: 2_000, procs: 12, read_pct: 80, unknown_pct: 15, ..BASE },
            ),
            ("2000 ops, 12 clients, puts only", GenCfg { ops: 2_000, procs: 12, cas_pct: 0, unknown_pct: 3, ..BASE }),
        ];
        for (i, (name, cfg)) in cases.iter().enumerate() {
            let ops = generate(1_000 + i as u64, *cfg);
            let unknown = ops.iter().filter(|o| o.outcome == Outcome::Unknown && o.kind != OpKind::Read).count();
            let t = Instant::now();
            let verdict = check_key(&ops);
            let ok_ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(verdict, KeyVerdict::Linearizable, "{name}: {verdict}");
            let mut report = format!("perf {name}, {unknown} unknown writes: linearizable {ok_ms:.1} ms");
            for (label, permille) in [("early", 100), ("late", 950)] {
                let (mutated, culprit) = stale_read_mutation(&ops, permille).expect("mutation");
                let t = Instant::now();
                let verdict = check_key(&mutated);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let window = verdict.window().expect("violation");
                assert_eq!(window.culprit, culprit, "{name}: {verdict}");
                report += &format!("; {label} stale read {ms:.1} ms (window {} ops)", window.ops.len());
            }
            println!("{report}");
        }
    }
}
