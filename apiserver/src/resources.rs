//! The served resources: names as discovery lists them, Table columns, the fields a field
//! selector may name, and the OpenAPI schema of each kind.

use serde_json::{Value, json};

use crate::views::ViewObject;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    IpamAllocations,
    MacAddresses,
    DhcpLeases,
}

pub struct Column {
    pub name: &'static str,
    pub type_: &'static str,
    pub description: &'static str,
    /// 0: always shown; 1: with `-o wide`.
    pub priority: i32,
    /// The field shown, or `None` for the name column.
    pub field: Option<&'static str>,
}

pub struct ResourceDef {
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub short_names: &'static [&'static str],
    pub description: &'static str,
    pub columns: &'static [Column],
    /// Top-level fields a field selector may name (besides metadata.name/namespace).
    pub selectable: &'static [&'static str],
    /// Top-level fields with their OpenAPI type and description.
    pub fields: &'static [(&'static str, &'static str, &'static str)],
}

const fn col(
    name: &'static str,
    field: &'static str,
    priority: i32,
    description: &'static str,
) -> Column {
    Column {
        name,
        type_: "string",
        description,
        priority,
        field: Some(field),
    }
}

const NAME: Column = Column {
    name: "Name",
    type_: "string",
    description: "Name of the object: <pool>.<address or MAC with dashes>",
    priority: 0,
    field: None,
};

static IPAM: ResourceDef = ResourceDef {
    plural: "ipamallocations",
    singular: "ipamallocation",
    kind: "IPAMAllocation",
    short_names: &["ipamalloc"],
    description: "IPAMAllocation is one address of an IPPool that is not free: allocated to a \
                  NIC (dynamically or statically), reserved (server IP, router) or excluded. \
                  A read-only view of the IPPoolAddress objects (one per allocated address) \
                  and the IPPool spec (network.harvesterhci.io).",
    columns: &[
        NAME,
        col("Address", "address", 0, "The IP address"),
        col("MAC", "mac", 0, "The MAC address holding it"),
        col(
            "State",
            "state",
            0,
            "allocated, static, reserved or excluded",
        ),
        col("Owner", "owner", 0, "<namespace>/<VM> holding the address"),
        col("Pool", "pool", 1, "The IPPool (same namespace)"),
        col("Network", "network", 1, "The VM network <namespace>/<name>"),
        col("Interface", "interface", 1, "The VM's NIC, when known"),
    ],
    selectable: &[
        "pool",
        "network",
        "address",
        "mac",
        "state",
        "owner",
        "interface",
    ],
    fields: &[
        (
            "pool",
            "string",
            "Name of the IPPool (in the same namespace).",
        ),
        (
            "network",
            "string",
            "The VM network (NetworkAttachmentDefinition) as <namespace>/<name>.",
        ),
        ("address", "string", "The IP address (IPv4 today)."),
        (
            "mac",
            "string",
            "The MAC address the address is allocated to (lower case, colons); absent when reserved or excluded.",
        ),
        (
            "state",
            "string",
            "allocated (chosen by the IPAM), static (asked for by address: the VM's static-ip.harvesterhci.io/<nic> annotation or a vmnetcfg entry created with its ipAddress; IPPoolAddress spec.static), reserved (the spec's server IP or router, inside the range) or excluded (the spec's pool.exclude).",
        ),
        (
            "owner",
            "string",
            "The VirtualMachine (and its VirtualMachineNetworkConfig, of the same name) holding the address, as <namespace>/<name>, from the IPPoolAddress; absent for an allocation migrated from a Go version's status that named none, until it is adopted (by the controller, or by the webhook when its owner asks again).",
        ),
        (
            "interface",
            "string",
            "The VM's NIC holding the address, when known (IPPoolAddress spec.interface).",
        ),
    ],
};

static MACS: ResourceDef = ResourceDef {
    plural: "macaddresses",
    singular: "macaddress",
    kind: "MACAddress",
    short_names: &["macaddr"],
    description: "MACAddress is the MAC cache of a VM network: one object per MAC that holds an \
                  address in an IPPool, with that address. A read-only view of the \
                  IPPoolAddress objects (network.harvesterhci.io).",
    columns: &[
        NAME,
        col("MAC", "mac", 0, "The MAC address"),
        col("Address", "address", 0, "The IP address it holds"),
        col("Network", "network", 0, "The VM network <namespace>/<name>"),
        col("Owner", "owner", 0, "<namespace>/<VM>"),
        col("State", "state", 1, "allocated or static"),
        col("Pool", "pool", 1, "The IPPool"),
        col("Interface", "interface", 1, "The VM's NIC, when known"),
    ],
    selectable: &[
        "pool",
        "network",
        "address",
        "mac",
        "state",
        "owner",
        "interface",
    ],
    fields: &[
        ("mac", "string", "The MAC address (lower case, colons)."),
        ("network", "string", "The VM network as <namespace>/<name>."),
        (
            "pool",
            "string",
            "Name of the IPPool (in the same namespace).",
        ),
        ("address", "string", "The IP address the MAC holds."),
        (
            "state",
            "string",
            "allocated (chosen by the IPAM) or static (asked for by address).",
        ),
        (
            "owner",
            "string",
            "The VirtualMachine (and its vmnetcfg) as <namespace>/<name>.",
        ),
        ("interface", "string", "The VM's NIC, when known."),
    ],
};

static LEASES: ResourceDef = ResourceDef {
    plural: "dhcpleases",
    singular: "dhcplease",
    kind: "DHCPLease",
    short_names: &["dhcplease"],
    description: "DHCPLease is what the active DHCP agent of an IPPool serves for one address: \
                  the client's MAC, the lease state and times. Read from the active agent \
                  (GET /api/v1/leases), as metrics-server reads kubelets.",
    columns: &[
        NAME,
        col("Address", "address", 0, "The leased IPv4 address"),
        col("MAC", "mac", 0, "The client's MAC address"),
        col(
            "State",
            "state",
            0,
            "static-never-seen, offered, bound, expired, released or declined",
        ),
        col("Expiry", "expiry", 0, "When the lease expires (RFC 3339)"),
        col(
            "Last Seen",
            "lastSeen",
            0,
            "The client's last DHCP message (RFC 3339)",
        ),
        col(
            "Lease Start",
            "leaseStart",
            1,
            "When the lease was granted (RFC 3339)",
        ),
        col("Agent", "agent", 1, "The agent pod serving the pool"),
    ],
    selectable: &["pool", "network", "address", "mac", "state", "agent"],
    fields: &[
        (
            "pool",
            "string",
            "Name of the IPPool (in the same namespace).",
        ),
        ("network", "string", "The VM network as <namespace>/<name>."),
        ("address", "string", "The leased IPv4 address."),
        ("mac", "string", "The client's MAC address."),
        (
            "state",
            "string",
            "static-never-seen, offered, bound, expired, released or declined.",
        ),
        (
            "leaseStart",
            "string",
            "When the lease was granted (RFC 3339), if it was.",
        ),
        ("expiry", "string", "When the lease expires (RFC 3339)."),
        (
            "lastSeen",
            "string",
            "When the client last sent a DHCP message (RFC 3339).",
        ),
        (
            "declines",
            "integer",
            "How often the client declined the address.",
        ),
        ("agent", "string", "The agent pod that served this view."),
        ("serverIP", "string", "The address the agent answers from."),
    ],
};

impl Resource {
    pub const ALL: [Resource; 3] = [
        Resource::IpamAllocations,
        Resource::MacAddresses,
        Resource::DhcpLeases,
    ];

    pub fn def(self) -> &'static ResourceDef {
        match self {
            Resource::IpamAllocations => &IPAM,
            Resource::MacAddresses => &MACS,
            Resource::DhcpLeases => &LEASES,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// By plural, singular, kind (any case) or short name, as clients name it in paths.
    pub fn from_plural(plural: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.def().plural == plural)
    }
}

impl ResourceDef {
    pub fn column_definitions(&self) -> Value {
        Value::Array(
            self.columns
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name, "type": c.type_,
                        "format": if c.field.is_none() { "name" } else { "" },
                        "description": c.description, "priority": c.priority,
                    })
                })
                .collect(),
        )
    }

    pub fn cells(&self, obj: &ViewObject) -> Value {
        Value::Array(
            self.columns
                .iter()
                .map(|c| match c.field {
                    None => Value::String(obj.name.clone()),
                    Some(f) => match obj.fields.get(f) {
                        Some(Value::Null) | None => Value::String("<none>".into()),
                        Some(v) => v.clone(),
                    },
                })
                .collect(),
        )
    }

    pub fn is_selectable(&self, field: &str) -> bool {
        if field == "metadata.name" || field == "metadata.namespace" {
            return true;
        }
        let name = field
            .strip_prefix("spec.")
            .or_else(|| field.strip_prefix("status."))
            .unwrap_or(field);
        self.selectable.contains(&name)
    }
}
