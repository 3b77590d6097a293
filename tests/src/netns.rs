//! A private network for tests, made of Linux network namespaces: [`PrivateNetwork`] is a
//! namespace playing an Azure vNet (say), joined to the test's own namespace (the host, playing
//! the internet) by a veth pair, with an optional firewall inside that admits from outside only
//! traffic belonging to connections the namespace opened, as a VM without a public IP behind NAT.
//!
//! Every name carries the run's id (`opv-<id>`, the veth ends `opvh<id>` and `opvn<id>`), and
//! the id starts with the test process's pid, so parallel runs never collide and a later run can
//! tell which leftovers belong to a process that no longer exists ([`remove_stale`]).
//! Dropping a [`PrivateNetwork`] kills what still runs inside, deletes the namespace, its veth
//! pair and its `/etc/netns/<name>` directory, also when the test panics.
//!
//! It needs root, `ip` (iproute2) and `iptables`; [`unavailable`] says why they cannot be used.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;

/// What every name this module makes starts with.
pub const PREFIX: &str = "opv-";

/// Why network namespaces cannot be made here, or `None` when they can.
pub fn unavailable() -> Option<String> {
    // `/proc/self` belongs to the process's effective user.
    let euid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if euid.ok() != Some(0) {
        return Some("network namespaces need root".into());
    }
    match std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("`ip` (iproute2) cannot run: {e}")),
    }
    match std::process::Command::new("iptables")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`iptables --version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!(
            "`iptables` cannot run (apt-get install iptables): {e}"
        )),
    }
}

/// Runs `program args`, returning its output; panics when it cannot be started.
fn run(program: &str, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {program} {args:?}: {e}"))
}

/// Runs `program args` and panics, with its stderr, when it fails.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace joined to the host by a veth pair on a /30 of `10.213.0.0/16`.
pub struct PrivateNetwork {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl PrivateNetwork {
    /// Removes stale namespaces of dead test processes, then makes namespace `opv-<id>` with
    /// `lo` up and a veth pair: `host_ip()/30` on the host, `ns_ip()/30` inside.
    ///
    /// Panics when a command fails; check [`unavailable`] first.
    pub fn create() -> PrivateNetwork {
        remove_stale();
        let (id, host_ip, ns_ip) = free_subnet();
        let network = PrivateNetwork {
            name: format!("{PREFIX}{id}"),
            host_if: format!("opvh{id}"),
            ns_if: format!("opvn{id}"),
            host_ip,
            ns_ip,
        };
        // The guard exists before the first command, so a failure half-way is cleaned up too.
        run_ok("ip", &["netns", "add", &network.name]);
        let ip = |args: &[&str]| run_ok("ip", args);
        ip(&["-n", &network.name, "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &network.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &network.ns_if,
            "netns",
            &network.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &network.host_if,
        ]);
        ip(&["link", "set", &network.host_if, "up"]);
        ip(&[
            "-n",
            &network.name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &network.ns_if,
        ]);
        ip(&["-n", &network.name, "link", "set", &network.ns_if, "up"]);
        network
    }

    /// The namespace's name, `opv-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's end of the veth pair, e.g. `10.213.7.1`.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's end of the veth pair, e.g. `10.213.7.2`.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The veth interface inside the namespace.
    pub fn ns_interface(&self) -> &str {
        &self.ns_if
    }

    /// Binds a TCP listener on `addr` inside the namespace (see [`crate::kube::bind_in_netns`]).
    pub fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        crate::kube::bind_in_netns(&self.name, addr)
    }

    /// Writes `/etc/netns/<name>/hosts`, which `ip netns exec` mounts over `/etc/hosts` for
    /// the programs it starts: `localhost` and the `(address, name)` pairs given.
    pub fn write_hosts(&self, entries: &[(Ipv4Addr, &str)]) {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("could not create {}: {e}", dir.display()));
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let path = dir.join("hosts");
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
    }

    /// Installs the firewall inside the namespace: on the veth, only packets of connections
    /// the namespace opened (established or related) come in; everything else is dropped, so
    /// nothing outside can open a connection to anything inside.
    pub fn admit_only_established_from_outside(&self) {
        let ns_if = self.ns_if.clone();
        self.iptables(&[
            "-A",
            "INPUT",
            "-i",
            &ns_if,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
        self.iptables(&["-A", "INPUT", "-i", &ns_if, "-j", "DROP"]);
    }

    /// Runs `iptables ARGS` inside the namespace and returns its stdout; panics when it fails.
    pub fn iptables(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "iptables", "-w"];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// The `INPUT` chain's rules as `iptables -S INPUT` prints them.
    pub fn input_rules(&self) -> String {
        self.iptables(&["-S", "INPUT"])
    }

    /// How many packets the `INPUT` chain's `DROP` rules dropped so far.
    pub fn dropped_packets(&self) -> u64 {
        self.iptables(&["-L", "INPUT", "-v", "-n", "-x"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(2) == Some(&"DROP"))
                    .then(|| fields[0].parse::<u64>().ok())
                    .flatten()
            })
            .sum()
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <name> program`),
    /// killed when dropped; `ip` execs the program, so the child's pid is the program's.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .kill_on_drop(true);
        cmd
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }
}

impl Drop for PrivateNetwork {
    fn drop(&mut self) {
        remove(&self.name, Some(&self.host_if));
    }
}

/// Picks a fresh id and a /30 of `10.213.0.0/16` that no host interface uses yet.
fn free_subnet() -> (String, Ipv4Addr, Ipv4Addr) {
    let in_use = run_ok("ip", &["-o", "-4", "addr", "show"]);
    for _ in 0..64 {
        let random: u16 = rand::random();
        let id = format!("{:06x}{random:04x}", std::process::id() & 0xff_ffff);
        // The id's random half chooses the subnet: 10.213.X.(4k+1) and 10.213.X.(4k+2).
        let (x, k) = ((random >> 6) as u8, (random & 0x3f) as u8);
        let host_ip = Ipv4Addr::new(10, 213, x, 4 * k + 1);
        let ns_ip = Ipv4Addr::new(10, 213, x, 4 * k + 2);
        let used = |ip: Ipv4Addr| in_use.contains(&format!(" {ip}/"));
        let net = Ipv4Addr::new(10, 213, x, 4 * k);
        if !used(host_ip) && !in_use.contains(&format!(" {net}/")) {
            return (id, host_ip, ns_ip);
        }
    }
    panic!("no free /30 in 10.213.0.0/16 after 64 tries:\n{in_use}");
}

/// Deletes what earlier runs left behind: namespaces and host veth ends with this module's
/// names whose test process no longer exists (a run killed before its guard could drop).
pub fn remove_stale() {
    let alive = |id: &str| {
        id.get(..6)
            .and_then(|pid| u32::from_str_radix(pid, 16).ok())
            .is_none_or(|pid| Path::new("/proc").join(pid.to_string()).exists())
    };
    let namespaces = run_ok("ip", &["netns", "list"]);
    for name in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if let Some(id) = name.strip_prefix(PREFIX)
            && id.len() == 10
            && !alive(id)
        {
            remove(name, Some(&format!("opvh{id}")));
        }
    }
    let links = run_ok("ip", &["-o", "link", "show"]);
    for link in links.lines().filter_map(|l| l.split(": ").nth(1)) {
        let link = link.split('@').next().unwrap_or(link);
        if let Some(id) = link.strip_prefix("opvh")
            && id.len() == 10
            && !alive(id)
        {
            let _ = run("ip", &["link", "del", link]);
        }
    }
}

/// Kills the processes inside namespace `name` (by pid: all were started by the test that
/// made it), deletes it, the host's veth end and `/etc/netns/<name>`; ignores what is gone.
fn remove(name: &str, host_if: Option<&str>) {
    let pids = run("ip", &["netns", "pids", name]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _ = run("ip", &["netns", "del", name]);
    // Deleting the namespace takes its veth end along, and with it the host's; this covers a
    // pair made while the namespace was being set up.
    if let Some(host_if) = host_if {
        let _ = run("ip", &["link", "del", host_if]);
    }
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
}
