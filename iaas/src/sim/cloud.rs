//! The simulated cloud: instances, vxnets, NICs and jobs, and what each action does to them.
//! Pure: the time comes in as arguments, so the state machine is tested without a server.
//!
//! NIC states: `CreateNics` makes `available` NICs at once; `AttachNics` needs every NIC
//! `available` and idle and the instance running, and starts a job (`pending` → `working` →
//! `successful`, then the NICs are `in-use`, or `failed`, then they stay `available`);
//! `DetachNics` needs `in-use` and idle; `DeleteNics` needs `available` and idle. A NIC under
//! a job is busy. Violations are 1400 `PermissionDenied, …`, unknown ids 2100
//! `ResourceNotFound, …` (hostnic matches that word), malformed parameters 1100.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::error::code;
use crate::sign::Params;
use crate::timefmt;
use crate::types::{action, AccessKey, Job, JobStatus, Nic, NicStatus, PAGE_LIMIT};

/// An API error as the simulator answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// `ret_code`.
    pub code: u32,
    /// `message`, `<ErrorName>, <text>` as the API writes it.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn malformed(text: impl fmt::Display) -> Self {
        Self::new(code::MALFORMED, format!("InvalidParameter, {text}"))
    }

    fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            code::RESOURCE_NOT_FOUND,
            format!("ResourceNotFound, resource [{id}] of type [{kind}] not found"),
        )
    }

    fn denied(text: impl fmt::Display) -> Self {
        Self::new(code::PERMISSION_DENIED, format!("PermissionDenied, {text}"))
    }
}

/// A vxnet of the simulated account: `ID=CIDR`, optionally `,no-router` (not bound to a
/// VPC: `router` is null) or `,no-dhcp` (a router without a DHCP range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxnetSpec {
    /// `vxnet-…`.
    pub id: String,
    /// Its subnet.
    pub cidr: Ipv4Net,
    /// Whether it has a router (is in a VPC).
    pub router: bool,
    /// Whether the router has a DHCP range.
    pub dhcp: bool,
}

impl FromStr for VxnetSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let head = parts.next().unwrap_or("");
        let (id, cidr) = head
            .split_once('=')
            .ok_or_else(|| format!("vxnet {text:?} is not ID=CIDR[,no-router][,no-dhcp]"))?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("vxnet id {id:?} is not an id like vxnet-abc1234"));
        }
        let cidr: Ipv4Net = cidr
            .parse()
            .map_err(|e| format!("vxnet {id}: {cidr:?} is not an IPv4 CIDR: {e}"))?;
        if cidr.prefix_len() > 29 || cidr.prefix_len() < 16 {
            return Err(format!("vxnet {id}: {cidr} must be from /16 to /29"));
        }
        let mut spec = Self {
            id: id.to_string(),
            cidr: cidr.trunc(),
            router: true,
            dhcp: true,
        };
        for flag in parts {
            match flag {
                "no-router" => spec.router = false,
                "no-dhcp" => spec.dhcp = false,
                other => return Err(format!("vxnet {id}: unknown flag {other:?}")),
            }
        }
        Ok(spec)
    }
}

/// What the simulated account holds at start.
#[derive(Debug, Clone)]
pub struct CloudSpec {
    /// The zone.
    pub zone: String,
    /// The user id owning everything (`usr-…`).
    pub owner: String,
    /// The access key, answered by `DescribeAccessKeys`.
    pub access_key_id: String,
    /// Running instances.
    pub instances: Vec<String>,
    /// Vxnets.
    pub vxnets: Vec<VxnetSpec>,
    /// NICs an instance can hold, its primary NIC included (64).
    pub nic_limit_per_instance: u32,
}

struct VxnetState {
    spec: VxnetSpec,
    used: BTreeSet<Ipv4Addr>,
    create_time: String,
}

impl VxnetState {
    fn gateway(&self) -> Option<Ipv4Addr> {
        self.spec
            .router
            .then(|| Ipv4Addr::from(u32::from(self.spec.cidr.network()).saturating_add(1)))
    }

    /// Whether `ip` is an address a NIC of this vxnet may have.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        self.spec.cidr.contains(&ip)
            && ip != self.spec.cidr.network()
            && ip != self.spec.cidr.broadcast()
            && Some(ip) != self.gateway()
    }

    fn capacity(&self) -> usize {
        let hosts = (1usize << (32 - self.spec.cidr.prefix_len())) - 2;
        hosts - usize::from(self.spec.router)
    }

    fn dhcp_range(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        (self.spec.router && self.spec.dhcp).then(|| {
            let net = u32::from(self.spec.cidr.network());
            let broadcast = u32::from(self.spec.cidr.broadcast());
            (Ipv4Addr::from(net + 2), Ipv4Addr::from(broadcast - 1))
        })
    }

    /// The lowest free address, from the DHCP range when there is one.
    fn next_free(&self, also_taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = self.dhcp_range().unwrap_or_else(|| {
            (
                Ipv4Addr::from(u32::from(self.spec.cidr.network()) + 1),
                Ipv4Addr::from(u32::from(self.spec.cidr.broadcast()) - 1),
            )
        });
        (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .find(|ip| self.usable(*ip) && !self.used.contains(ip) && !also_taken.contains(ip))
    }

    fn describe(&self, owner: &str, zone: &str, nics: usize) -> Value {
        let router = self.spec.router.then(|| {
            let (start, end) = self
                .dhcp_range()
                .map(|(s, e)| (s.to_string(), e.to_string()))
                .unwrap_or_default();
            json!({
                "router_id": self.router_id(),
                "router_name": format!("router of {}", self.spec.id),
                "manager_ip": self.gateway().map(|g| g.to_string()).unwrap_or_default(),
                "ip_network": self.spec.cidr.to_string(),
                "dyn_ip_start": start,
                "dyn_ip_end": end,
                "mode": 0,
            })
        });
        json!({
            "vxnet_id": self.spec.id,
            "vxnet_name": self.spec.id,
            "vxnet_type": 1,
            "description": "",
            "router": router,
            "vpc_router_id": if self.spec.router { self.router_id() } else { String::new() },
            "tunnel_type": "vxlan",
            "available_ip_count": self.capacity().saturating_sub(nics),
            "owner": owner,
            "zone_id": zone,
            "create_time": self.create_time,
        })
    }

    fn router_id(&self) -> String {
        let tail: String = self
            .spec
            .id
            .trim_start_matches("vxnet-")
            .chars()
            .take(8)
            .collect();
        format!("rtr-{tail:0>8}")
    }
}

struct NicRecord {
    nic: Nic,
    busy_with: Option<String>,
}

struct JobRecord {
    job: Job,
    nics: Vec<String>,
    instance: Option<String>,
    working_at: Instant,
    done_at: Instant,
    fail: bool,
}

/// A change of a NIC's attachment that a finished job made (for plugging a real link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicEvent {
    /// The NIC is now attached to the instance.
    Attached {
        /// NIC id (MAC).
        nic_id: String,
        /// Instance.
        instance_id: String,
    },
    /// The NIC is no longer attached.
    Detached {
        /// NIC id (MAC).
        nic_id: String,
    },
}

/// The simulated account.
pub struct Cloud {
    spec: CloudSpec,
    running: BTreeMap<String, bool>,
    vxnets: BTreeMap<String, VxnetState>,
    nics: BTreeMap<String, NicRecord>,
    jobs: BTreeMap<String, JobRecord>,
    seed: u64,
    counter: u64,
    /// How long the next jobs take.
    pub job_duration: Duration,
    /// How many of the next jobs fail.
    pub fail_next_jobs: u32,
    events: Vec<NicEvent>,
}

impl fmt::Debug for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cloud")
            .field("zone", &self.spec.zone)
            .field("nics", &self.nics.len())
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

/// The ids listed as `name.1`, `name.2`, … in order of their index.
fn list(params: &Params, name: &str) -> Result<Vec<String>, ApiError> {
    let prefix = format!("{name}.");
    let mut items = Vec::new();
    for (key, value) in params {
        if let Some(index) = key.strip_prefix(&prefix) {
            let n: usize = index.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::malformed(format!("[{key}] is not {name}.N with N ≥ 1"))
            })?;
            items.push((n, value.clone()));
        }
    }
    items.sort();
    Ok(items.into_iter().map(|(_, v)| v).collect())
}

fn required<'a>(params: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    params
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::malformed(format!("parameter [{name}] is required")))
}

fn number(params: &Params, name: &str, default: u64) -> Result<u64, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::malformed(format!("[{name}] should be a number, not [{v}]"))),
    }
}

/// `offset` and `limit` (default 20, at most 100; 0 means the default).
fn paging(params: &Params) -> Result<(usize, usize), ApiError> {
    let offset = usize::try_from(number(params, "offset", 0)?).unwrap_or(usize::MAX);
    let limit = match number(params, "limit", 20)? {
        0 => 20,
        l => usize::try_from(l).unwrap_or(PAGE_LIMIT).min(PAGE_LIMIT),
    };
    Ok((offset, limit))
}

fn page(action: &str, set: &str, rows: Vec<Value>, params: &Params) -> Result<Value, ApiError> {
    let (offset, limit) = paging(params)?;
    let total = rows.len();
    let rows: Vec<Value> = rows.into_iter().skip(offset).take(limit).collect();
    Ok(
        json!({ "action": format!("{action}Response"), "ret_code": 0, "total_count": total, set: rows }),
    )
}

fn no_duplicates(items: &[String], what: &str) -> Result<(), ApiError> {
    let mut seen = BTreeSet::new();
    for item in items {
        if !seen.insert(item) {
            return Err(ApiError::malformed(format!(
                "{what} [{item}] is given twice"
            )));
        }
    }
    Ok(())
}

impl Cloud {
    /// The account at start; `seed` makes NIC and job ids differ between simulators.
    pub fn new(spec: CloudSpec, seed: u64, unix: i64) -> Self {
        let running = spec.instances.iter().map(|i| (i.clone(), true)).collect();
        let vxnets = spec
            .vxnets
            .iter()
            .map(|v| {
                (
                    v.id.clone(),
                    VxnetState {
                        spec: v.clone(),
                        used: BTreeSet::new(),
                        create_time: timefmt::format_utc(unix),
                    },
                )
            })
            .collect();
        Self {
            spec,
            running,
            vxnets,
            nics: BTreeMap::new(),
            jobs: BTreeMap::new(),
            seed,
            counter: 0,
            job_duration: Duration::from_millis(300),
            fail_next_jobs: 0,
            events: Vec::new(),
        }
    }

    /// Starts or stops an instance; false if there is no such instance.
    pub fn set_running(&mut self, instance: &str, running: bool) -> bool {
        match self.running.get_mut(instance) {
            Some(r) => {
                *r = running;
                true
            }
            None => false,
        }
    }

    /// Every NIC, by id.
    pub fn nics(&self) -> Vec<Nic> {
        self.nics.values().map(|r| r.nic.clone()).collect()
    }

    /// Every job, by id.
    pub fn jobs(&self) -> Vec<Job> {
        self.jobs.values().map(|r| r.job.clone()).collect()
    }

    /// The attachment changes made since the last call.
    pub fn take_events(&mut self) -> Vec<NicEvent> {
        std::mem::take(&mut self.events)
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.seed
            .wrapping_add(self.counter.wrapping_mul(0x9E37_79B9))
    }

    fn new_mac(&mut self) -> String {
        loop {
            let b = self.next_id().to_be_bytes();
            let mac = format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7]);
            if !self.nics.contains_key(&mac) {
                return mac;
            }
        }
    }

    fn new_job_id(&mut self) -> String {
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        loop {
            let mut n = self.next_id();
            let id: String = (0..8)
                .map(|_| {
                    let c = ALPHABET[(n % 36) as usize];
                    n /= 36;
                    char::from(c)
                })
                .collect();
            let id = format!("j-{id}");
            if !self.jobs.contains_key(&id) {
                return id;
            }
        }
    }

    /// Moves jobs on: `pending` → `working` after a quarter of their time, then done.
    pub fn advance(&mut self, now: Instant, unix: i64) {
        let stamp = timefmt::format_utc(unix);
        let due: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| matches!(j.job.status, JobStatus::Pending | JobStatus::Working))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if now >= job.done_at {
                job.job.status = if job.fail {
                    JobStatus::Failed
                } else {
                    JobStatus::Successful
                };
                job.job.status_time = stamp.clone();
                let (nics, instance, fail) = (job.nics.clone(), job.instance.clone(), job.fail);
                let attach = job.job.job_action == action::ATTACH_NICS;
                for nic_id in nics {
                    self.finish_nic(&nic_id, attach, instance.as_deref(), fail, &stamp);
                }
            } else if now >= job.working_at && job.job.status == JobStatus::Pending {
                job.job.status = JobStatus::Working;
                job.job.status_time = stamp.clone();
            }
        }
    }

    fn finish_nic(
        &mut self,
        nic_id: &str,
        attach: bool,
        instance: Option<&str>,
        fail: bool,
        stamp: &str,
    ) {
        let sequence = instance.map(|i| self.free_sequence(i)).unwrap_or(0);
        let Some(record) = self.nics.get_mut(nic_id) else {
            return;
        };
        record.busy_with = None;
        if fail {
            return;
        }
        record.nic.status_time = stamp.to_string();
        if attach {
            record.nic.status = NicStatus::InUse;
            record.nic.instance_id = instance.unwrap_or("").to_string();
            record.nic.sequence = sequence;
            self.events.push(NicEvent::Attached {
                nic_id: nic_id.to_string(),
                instance_id: instance.unwrap_or("").to_string(),
            });
        } else {
            record.nic.status = NicStatus::Available;
            record.nic.instance_id = String::new();
            record.nic.sequence = 0;
            self.events.push(NicEvent::Detached {
                nic_id: nic_id.to_string(),
            });
        }
    }

    /// The lowest NIC index on `instance` that no NIC has (0 is the primary NIC's).
    fn free_sequence(&self, instance: &str) -> u32 {
        let taken: BTreeSet<u32> = self
            .nics
            .values()
            .filter(|r| r.nic.instance_id == instance)
            .map(|r| r.nic.sequence)
            .collect();
        (1..).find(|s| !taken.contains(s)).unwrap_or(1)
    }

    /// Carries out one action. `now`/`unix` time the jobs and stamp the rows.
    pub fn handle(
        &mut self,
        act: &str,
        params: &Params,
        now: Instant,
        unix: i64,
    ) -> Result<Value, ApiError> {
        self.advance(now, unix);
        match act {
            action::CREATE_NICS => self.create_nics(params, unix),
            action::ATTACH_NICS => self.attach_nics(params, now, unix),
            action::DETACH_NICS => self.detach_nics(params, now, unix),
            action::DELETE_NICS => self.delete_nics(params),
            action::DESCRIBE_NICS => self.describe_nics(params),
            action::DESCRIBE_VXNETS => self.describe_vxnets(params),
            action::DESCRIBE_JOBS => self.describe_jobs(params),
            action::DESCRIBE_ACCESS_KEYS => self.describe_access_keys(params),
            other => Err(ApiError::new(
                code::BAD_REQUEST,
                format!("InvalidAction, action [{other}] is not supported by this simulator"),
            )),
        }
    }

    fn create_nics(&mut self, params: &Params, unix: i64) -> Result<Value, ApiError> {
        let vxnet_id = required(params, "vxnet")?.to_string();
        let ips = list(params, "private_ips")?;
        let count = number(params, "count", 1)?;
        if !(1..=252).contains(&count) {
            return Err(ApiError::malformed(format!(
                "count [{count}] should be from 1 to 252"
            )));
        }
        let count = usize::try_from(count).unwrap_or(252);
        let disable_ip = number(params, "disable_ip", 0)? == 1;
        if !ips.is_empty() && ips.len() != count {
            return Err(ApiError::malformed(format!(
                "count [{count}] does not match the {} private_ips given",
                ips.len()
            )));
        }
        if disable_ip && !ips.is_empty() {
            return Err(ApiError::malformed(
                "disable_ip and private_ips exclude each other",
            ));
        }
        let nic_name = params.get("nic_name").cloned().unwrap_or_default();
        let in_vxnet = self
            .nics
            .values()
            .filter(|r| r.nic.vxnet_id == vxnet_id)
            .count();
        let vxnet = self
            .vxnets
            .get(&vxnet_id)
            .ok_or_else(|| ApiError::not_found("vxnet", &vxnet_id))?;
        if in_vxnet + count > vxnet.capacity() {
            return Err(ApiError::denied(format!(
                "vxnet [{vxnet_id}] has no room for {count} more NICs: {in_vxnet} of {} used",
                vxnet.capacity()
            )));
        }
        let mut chosen: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut addresses = Vec::with_capacity(count);
        for text in &ips {
            let ip: Ipv4Addr = text.parse().map_err(|_| {
                ApiError::malformed(format!("private_ip [{text}] is not an IPv4 address"))
            })?;
            if !vxnet.usable(ip) {
                return Err(ApiError::malformed(format!(
                    "private_ip [{ip}] is not a usable address of vxnet [{vxnet_id}] ({})",
                    vxnet.spec.cidr
                )));
            }
            if vxnet.used.contains(&ip) || !chosen.insert(ip) {
                return Err(ApiError::denied(format!(
                    "private_ip [{ip}] is already in use in vxnet [{vxnet_id}]"
                )));
            }
            addresses.push(Some(ip));
        }
        if ips.is_empty() {
            for _ in 0..count {
                if disable_ip {
                    addresses.push(None);
                    continue;
                }
                let ip = vxnet.next_free(&chosen).ok_or_else(|| {
                    ApiError::denied(format!("vxnet [{vxnet_id}] has no free address"))
                })?;
                chosen.insert(ip);
                addresses.push(Some(ip));
            }
        }
        let stamp = timefmt::format_utc(unix);
        let mut created = Vec::with_capacity(count);
        for ip in addresses {
            let nic_id = self.new_mac();
            if let (Some(ip), Some(v)) = (ip, self.vxnets.get_mut(&vxnet_id)) {
                v.used.insert(ip);
            }
            let private_ip = ip.map(|i| i.to_string()).unwrap_or_default();
            created.push(json!({ "nic_id": nic_id, "private_ip": private_ip }));
            self.nics.insert(
                nic_id.clone(),
                NicRecord {
                    nic: Nic {
                        nic_id,
                        nic_name: nic_name.clone(),
                        status: NicStatus::Available,
                        instance_id: String::new(),
                        vxnet_id: vxnet_id.clone(),
                        private_ip,
                        role: 0,
                        sequence: 0,
                        create_time: stamp.clone(),
                        status_time: stamp.clone(),
                    },
                    busy_with: None,
                },
            );
        }
        Ok(json!({ "action": "CreateNicsResponse", "ret_code": 0, "nics": created }))
    }

    fn existing_nics(&self, params: &Params) -> Result<Vec<String>, ApiError> {
        let nics = list(params, "nics")?;
        if nics.is_empty() {
            return Err(ApiError::malformed("parameter [nics] is required"));
        }
        no_duplicates(&nics, "nic")?;
        for id in &nics {
            let record = self
                .nics
                .get(id)
                .ok_or_else(|| ApiError::not_found("nic", id))?;
            if let Some(job) = &record.busy_with {
                return Err(ApiError::denied(format!(
                    "nic [{id}] is busy with job [{job}], please try later"
                )));
            }
        }
        Ok(nics)
    }

    fn start_job(
        &mut self,
        act: &str,
        nics: Vec<String>,
        instance: Option<String>,
        now: Instant,
        unix: i64,
    ) -> Value {
        let job_id = self.new_job_id();
        let fail = self.fail_next_jobs > 0;
        self.fail_next_jobs = self.fail_next_jobs.saturating_sub(1);
        for id in &nics {
            if let Some(r) = self.nics.get_mut(id) {
                r.busy_with = Some(job_id.clone());
            }
        }
        let stamp = timefmt::format_utc(unix);
        let mut directive = json!({ "nics": nics });
        if let Some(i) = &instance {
            directive["instance"] = json!(i);
        }
        self.jobs.insert(
            job_id.clone(),
            JobRecord {
                job: Job {
                    job_id: job_id.clone(),
                    job_action: act.to_string(),
                    status: JobStatus::Pending,
                    directive: directive.to_string(),
                    resource_ids: nics.join(" "),
                    create_time: stamp.clone(),
                    status_time: stamp,
                    owner: self.spec.owner.clone(),
                },
                nics,
                instance,
                working_at: now + self.job_duration / 4,
                done_at: now + self.job_duration,
                fail,
            },
        );
        json!({ "action": format!("{act}Response"), "ret_code": 0, "job_id": job_id })
    }

    fn attach_nics(&mut self, params: &Params, now: Instant, unix: i64) -> Result<Value, ApiError> {
        let instance = required(params, "instance")?.to_string();
        let nics = self.existing_nics(params)?;
        match self.running.get(&instance) {
            None => return Err(ApiError::not_found("instance", &instance)),
            Some(false) => {
                return Err(ApiError::denied(format!(
                    "instance [{instance}] is not running, can not attach nics"
                )))
            }
            Some(true) => {}
        }
        for id in &nics {
            if self
                .nics
                .get(id)
                .is_some_and(|r| r.nic.status != NicStatus::Available)
            {
                return Err(ApiError::denied(format!(
                    "nic [{id}] is in-use, can not be attached"
                )));
            }
        }
        let held = self
            .nics
            .values()
            .filter(|r| {
                r.nic.instance_id == instance
                    || r.busy_with.as_ref().is_some_and(|j| {
                        self.jobs
                            .get(j)
                            .is_some_and(|job| job.instance.as_deref() == Some(instance.as_str()))
                    })
            })
            .count();
        let limit = usize::try_from(self.spec.nic_limit_per_instance).unwrap_or(usize::MAX);
        // The primary NIC counts against the limit.
        if 1 + held + nics.len() > limit {
            return Err(ApiError::denied(format!(
                "instance [{instance}] can have at most {limit} nics, it has {} and {} more were asked",
                1 + held,
                nics.len()
            )));
        }
        Ok(self.start_job(action::ATTACH_NICS, nics, Some(instance), now, unix))
    }

    fn detach_nics(&mut self, params: &Params, now: Instant, unix: i64) -> Result<Value, ApiError> {
        let nics = self.existing_nics(params)?;
        for id in &nics {
            if self
                .nics
                .get(id)
                .is_some_and(|r| r.nic.status != NicStatus::InUse)
            {
                return Err(ApiError::denied(format!(
                    "nic [{id}] is available, can not be detached"
                )));
            }
        }
        Ok(self.start_job(action::DETACH_NICS, nics, None, now, unix))
    }

    fn delete_nics(&mut self, params: &Params) -> Result<Value, ApiError> {
        let nics = self.existing_nics(params)?;
        for id in &nics {
            if self
                .nics
                .get(id)
                .is_some_and(|r| r.nic.status != NicStatus::Available)
            {
                return Err(ApiError::denied(format!(
                    "nic [{id}] is in-use, detach it before deleting it"
                )));
            }
        }
        for id in &nics {
            if let Some(record) = self.nics.remove(id) {
                if let (Ok(ip), Some(v)) = (
                    record.nic.private_ip.parse::<Ipv4Addr>(),
                    self.vxnets.get_mut(&record.nic.vxnet_id),
                ) {
                    v.used.remove(&ip);
                }
            }
        }
        Ok(json!({ "action": "DeleteNicsResponse", "ret_code": 0 }))
    }

    fn describe_nics(&self, params: &Params) -> Result<Value, ApiError> {
        let ids = list(params, "nics")?;
        let vxnets = list(params, "vxnets")?;
        let instances = list(params, "instances")?;
        let name = params.get("nic_name");
        let status = match params.get("status").map(String::as_str) {
            None | Some("") => None,
            Some("available") => Some(NicStatus::Available),
            Some("in-use") => Some(NicStatus::InUse),
            Some(other) => {
                return Err(ApiError::malformed(format!(
                    "status [{other}] should be available or in-use"
                )))
            }
        };
        let rows = self
            .nics
            .values()
            .map(|r| &r.nic)
            .filter(|n| ids.is_empty() || ids.contains(&n.nic_id))
            .filter(|n| vxnets.is_empty() || vxnets.contains(&n.vxnet_id))
            .filter(|n| instances.is_empty() || instances.contains(&n.instance_id))
            .filter(|n| name.is_none_or(|name| &n.nic_name == name))
            .filter(|n| status.is_none_or(|s| n.status == s))
            .map(|n| {
                let mut row = json!(n);
                row["owner"] = json!(self.spec.owner);
                row["security_group"] = json!("");
                row["tags"] = json!([]);
                row
            })
            .collect();
        page(action::DESCRIBE_NICS, "nic_set", rows, params)
    }

    fn describe_vxnets(&self, params: &Params) -> Result<Value, ApiError> {
        let ids = list(params, "vxnets")?;
        let rows = self
            .vxnets
            .values()
            .filter(|v| ids.is_empty() || ids.contains(&v.spec.id))
            .map(|v| {
                let nics = self
                    .nics
                    .values()
                    .filter(|r| r.nic.vxnet_id == v.spec.id)
                    .count();
                v.describe(&self.spec.owner, &self.spec.zone, nics)
            })
            .collect();
        page(action::DESCRIBE_VXNETS, "vxnet_set", rows, params)
    }

    fn describe_jobs(&self, params: &Params) -> Result<Value, ApiError> {
        let ids = list(params, "jobs")?;
        for id in &ids {
            if !self.jobs.contains_key(id) {
                return Err(ApiError::not_found("job", id));
            }
        }
        let statuses = list(params, "status")?;
        let rows = self
            .jobs
            .values()
            .map(|r| &r.job)
            .filter(|j| ids.is_empty() || ids.contains(&j.job_id))
            .filter(|j| statuses.is_empty() || statuses.iter().any(|s| s == j.status.as_str()))
            .map(|j| json!(j))
            .collect();
        page(action::DESCRIBE_JOBS, "job_set", rows, params)
    }

    fn describe_access_keys(&self, params: &Params) -> Result<Value, ApiError> {
        let ids = list(params, "access_keys")?;
        let key = AccessKey {
            access_key_id: self.spec.access_key_id.clone(),
            access_key_name: "qingcloud-sim".into(),
            owner: self.spec.owner.clone(),
            status: "active".into(),
        };
        let rows = if ids.is_empty() || ids.contains(&key.access_key_id) {
            vec![json!(key)]
        } else {
            Vec::new()
        };
        page(action::DESCRIBE_ACCESS_KEYS, "access_key_set", rows, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> Cloud {
        Cloud::new(
            CloudSpec {
                zone: "pek3a".into(),
                owner: "usr-test0001".into(),
                access_key_id: "AK".into(),
                instances: vec!["i-one".into()],
                vxnets: vec!["vxnet-a=10.0.0.0/29".parse().expect("spec")],
                nic_limit_per_instance: 64,
            },
            7,
            0,
        )
    }

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn vxnet_specs_parse_and_refuse_clearly() {
        let spec: VxnetSpec = "vxnet-a=172.16.3.7/24,no-dhcp".parse().expect("parses");
        assert_eq!(spec.cidr.to_string(), "172.16.3.0/24");
        assert!(spec.router && !spec.dhcp);
        let spec: VxnetSpec = "vxnet-b=172.16.3.0/24,no-router".parse().expect("parses");
        assert!(!spec.router);
        for (text, needle) in [
            ("vxnet-a", "ID=CIDR"),
            ("=10.0.0.0/24", "not an id"),
            ("vxnet-a=10.0.0.0", "not an IPv4 CIDR"),
            ("vxnet-a=10.0.0.0/30", "/16 to /29"),
            ("vxnet-a=10.0.0.0/8", "/16 to /29"),
            ("vxnet-a=10.0.0.0/24,dhcp", "unknown flag"),
        ] {
            let err = text.parse::<VxnetSpec>().expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_job_goes_pending_working_successful_with_time_and_moves_the_nic() {
        let mut c = cloud();
        let t0 = Instant::now();
        let created = c
            .handle(
                "CreateNics",
                &params(&[("vxnet", "vxnet-a"), ("count", "2")]),
                t0,
                0,
            )
            .expect("created");
        let ids: Vec<String> = created["nics"]
            .as_array()
            .expect("nics")
            .iter()
            .map(|n| n["nic_id"].as_str().expect("id").to_string())
            .collect();
        // 10.0.0.1 is the gateway; the DHCP range starts at .2.
        assert_eq!(created["nics"][0]["private_ip"], "10.0.0.2");
        assert_eq!(created["nics"][1]["private_ip"], "10.0.0.3");
        let attach = params(&[
            ("instance", "i-one"),
            ("nics.1", &ids[0]),
            ("nics.2", &ids[1]),
        ]);
        let job = c.handle("AttachNics", &attach, t0, 0).expect("job")["job_id"]
            .as_str()
            .expect("job id")
            .to_string();
        assert_eq!(c.jobs()[0].status, JobStatus::Pending);
        c.advance(t0 + Duration::from_millis(100), 1);
        assert_eq!(c.jobs()[0].status, JobStatus::Working);
        assert!(c.nics().iter().all(|n| n.status == NicStatus::Available));
        assert!(c.take_events().is_empty());
        c.advance(t0 + Duration::from_millis(300), 2);
        let jobs = c.jobs();
        assert_eq!(
            (jobs[0].job_id.as_str(), jobs[0].status),
            (job.as_str(), JobStatus::Successful)
        );
        assert_eq!(jobs[0].status_time, "1970-01-01T00:00:02Z");
        let nics = c.nics();
        assert!(nics
            .iter()
            .all(|n| n.status == NicStatus::InUse && n.instance_id == "i-one"));
        let mut sequences: Vec<u32> = nics.iter().map(|n| n.sequence).collect();
        sequences.sort_unstable();
        assert_eq!(sequences, [1, 2]);
        assert_eq!(c.take_events().len(), 2);

        let detach = params(&[("nics.1", &ids[0])]);
        c.handle("DetachNics", &detach, t0 + Duration::from_secs(1), 3)
            .expect("detach job");
        c.advance(t0 + Duration::from_secs(2), 4);
        assert_eq!(
            c.take_events(),
            vec![NicEvent::Detached {
                nic_id: ids[0].clone()
            }]
        );
        c.handle("DeleteNics", &detach, t0 + Duration::from_secs(2), 4)
            .expect("deleted");
        // The freed address is the lowest free one again.
        let again = c
            .handle(
                "CreateNics",
                &params(&[("vxnet", "vxnet-a")]),
                t0 + Duration::from_secs(2),
                4,
            )
            .expect("created");
        assert_eq!(again["nics"][0]["private_ip"], "10.0.0.2");
    }

    #[test]
    fn list_parameters_are_ordered_by_their_index_and_refused_when_malformed() {
        let p = params(&[("nics.10", "j"), ("nics.2", "b"), ("nics.1", "a")]);
        assert_eq!(list(&p, "nics").expect("list"), ["a", "b", "j"]);
        let bad = params(&[("nics.0", "a")]);
        assert_eq!(list(&bad, "nics").map_err(|e| e.code), Err(1100));
        let bad = params(&[("nics.x", "a")]);
        assert_eq!(list(&bad, "nics").map_err(|e| e.code), Err(1100));
        let mut c = cloud();
        let dup = params(&[
            ("nics.1", "52:54:00:00:00:01"),
            ("nics.2", "52:54:00:00:00:01"),
        ]);
        let err = c
            .handle("DeleteNics", &dup, Instant::now(), 0)
            .expect_err("twice");
        assert_eq!(err.code, 1100);
        let err = c
            .handle(
                "DescribeNics",
                &params(&[("limit", "x")]),
                Instant::now(),
                0,
            )
            .expect_err("limit");
        assert_eq!(err.code, 1100);
        let err = c
            .handle(
                "DescribeNics",
                &params(&[("status", "attaching")]),
                Instant::now(),
                0,
            )
            .expect_err("status");
        assert_eq!(err.code, 1100);
    }
}
