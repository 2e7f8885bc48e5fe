//! Hosts made of Linux network namespaces: one namespace per host, each with an `eth0` on a
//! bridge (in a namespace of its own, the "LAN"), plus the test process's own (root)
//! namespace on the same LAN, so the test can serve things the hosts reach and reach what
//! they serve. Links can be cut (the host's `eth0` goes down: packets vanish, no reset) and
//! slowed (`tc netem` delay where the kernel has it, else a `tbf` rate limit). Everything is
//! removed on drop.

use std::process::{Command, Stdio};

/// What went wrong making the namespaces; the test is skipped with it.
pub(crate) type Unavailable = String;

pub(crate) struct Lan {
    tag: String,
    /// `10.213.N`: this LAN's /24.
    prefix: String,
    lan_ns: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// Makes one namespace per name in `hosts`, all on one LAN with the root namespace.
    pub(crate) fn new(hosts: &[&str]) -> Result<Self, Unavailable> {
        let pid = std::process::id();
        let tag = format!("cc{:05x}", pid & 0xfffff);
        let lan = Self {
            prefix: format!("10.213.{}", pid % 250 + 1),
            lan_ns: format!("{tag}-lan"),
            hosts: hosts.iter().map(|h| format!("{tag}-{h}")).collect(),
            tag,
        };
        // From here on, whatever was made is removed on drop, even if this fails.
        lan.build()?;
        Ok(lan)
    }

    /// [`Lan::new`], or `None` where namespaces cannot be made (not root, no iproute2), said
    /// on stderr as the test's skip.
    pub(crate) fn new_or_skip(hosts: &[&str]) -> Option<Self> {
        match Self::new(hosts) {
            Ok(lan) => Some(lan),
            Err(why) => {
                eprintln!(
                    "SKIPPED: network namespaces cannot be made here ({why}); this test needs \
                     root and iproute2"
                );
                None
            }
        }
    }

    fn build(&self) -> Result<(), String> {
        let lan = self.lan_ns.as_str();
        ip(&["netns", "add", lan])?;
        ip(&["-n", lan, "link", "set", "lo", "up"])?;
        ip(&["-n", lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", lan, "link", "set", "br0", "up"])?;
        // The root namespace's port.
        let root_if = format!("{}r", self.tag);
        let root_peer = format!("{}p0", self.tag);
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", &root_peer,
        ])?;
        self.plug(&root_peer)?;
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", self.prefix),
            "dev",
            &root_if,
        ])?;
        ip(&["link", "set", &root_if, "up"])?;
        for (i, ns) in self.hosts.iter().enumerate() {
            let host_if = format!("{}h{i}", self.tag);
            let peer = format!("{}p{}", self.tag, i + 1);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &host_if, "netns", ns])?;
            ip(&["-n", ns, "link", "set", &host_if, "name", "eth0"])?;
            let addr = format!("{}/24", self.addr_of(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            self.plug(&peer)?;
        }
        Ok(())
    }

    /// Moves `port` (in the root namespace) onto the LAN's bridge.
    fn plug(&self, port: &str) -> Result<(), String> {
        let lan = self.lan_ns.as_str();
        ip(&["link", "set", port, "netns", lan])?;
        ip(&["-n", lan, "link", "set", port, "master", "br0"])?;
        ip(&["-n", lan, "link", "set", port, "up"])
    }

    fn index(&self, host: &str) -> usize {
        let ns = format!("{}-{host}", self.tag);
        self.hosts
            .iter()
            .position(|h| *h == ns)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    fn addr_of(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, 10 + i)
    }

    /// The test process's own address on the LAN.
    pub(crate) fn root_addr(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// `host`'s address on the LAN.
    pub(crate) fn addr(&self, host: &str) -> String {
        self.addr_of(self.index(host))
    }

    pub(crate) fn namespace(&self, host: &str) -> &str {
        &self.hosts[self.index(host)]
    }

    /// A command that runs `program` on `host` (`ip netns exec` execs it: the child's pid is
    /// the program's).
    pub(crate) fn command(&self, host: &str, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", self.namespace(host)])
            .arg(program);
        cmd
    }

    /// Gives the LAN an IPv6 prefix, `fd00:cc:N::/64` (the root namespace is `::1` on it, host
    /// i `::(10 + i)`), and makes `host` the holder of a whole /64 beside it, as an ISP's
    /// customer is: an AnyIP route lets it send from any address of `fd00:cc:N:1::/64`, and
    /// the root namespace routes that /64 to it. The root namespace's address and the held
    /// /64's prefix (`fd00:cc:N:1::`, to which a host part is appended).
    pub(crate) fn ipv6_slash_64(&self, host: &str) -> Result<(String, String), Unavailable> {
        let net = format!("fd00:cc:{:x}", std::process::id() % 0xfff0 + 1);
        let root = format!("{net}::1");
        let i = self.index(host);
        let ns = self.namespace(host);
        let own = format!("{net}::{:x}", 10 + i);
        let held = format!("{net}:1::");
        let root_if = format!("{}r", self.tag);
        // No duplicate address detection: the addresses are usable at once.
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{root}/64"),
            "dev",
            &root_if,
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{own}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "local",
            &format!("{held}/64"),
            "dev",
            "lo",
        ])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.ip_nonlocal_bind=1",
            ],
        )?;
        // Removed with the root namespace's LAN port when the LAN goes.
        ip(&[
            "-6",
            "route",
            "add",
            &format!("{held}/64"),
            "via",
            &own,
            "dev",
            &root_if,
        ])?;
        Ok((root, held))
    }

    /// Cuts `host` off the LAN: its packets are dropped, nothing is reset.
    pub(crate) fn cut(&self, host: &str) {
        ip(&["-n", self.namespace(host), "link", "set", "eth0", "down"]).unwrap();
    }

    pub(crate) fn mend(&self, host: &str) {
        ip(&["-n", self.namespace(host), "link", "set", "eth0", "up"]).unwrap();
    }

    /// Slows `host`'s link; says how (netem is not in every kernel).
    pub(crate) fn slow(&self, host: &str, delay_ms: u32) -> String {
        let ns = self.namespace(host);
        let delay = format!("{delay_ms}ms");
        let netem = [
            "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", &delay,
        ];
        if run("tc", &netem).is_ok() {
            return format!("tc netem delay {delay}");
        }
        // A token bucket: a busy worker's answers queue behind each other (up to 400 ms, then
        // TCP resends), so the link is slow, if not by a fixed delay.
        let tbf = [
            "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "64kbit", "burst",
            "1600", "latency", "400ms",
        ];
        run("tc", &tbf).unwrap();
        "tc tbf rate 64kbit (this kernel has no netem)".into()
    }

    pub(crate) fn unslow(&self, host: &str) {
        let _ = run(
            "tc",
            &[
                "-n",
                self.namespace(host),
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ],
        );
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace's interfaces go with it, and each veth's other end with them.
        for ns in self.hosts.iter().chain(std::iter::once(&self.lan_ns)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
