//! systemd's service manager over D-Bus, for the systemd cgroup driver: transient units with
//! resource properties (`StartTransientUnit`, or `SetUnitProperties` on a unit that exists),
//! stopping them, and reading the manager's and a unit's properties.
//!
//! [`Systemd::connect`] reaches the system manager on the system bus, as go-systemd does first
//! for upstream's kubelet; [`Systemd::connect_bus`] any manager on a given bus (a user
//! manager's session bus in tests). go-systemd's fallback, the manager's private socket
//! `/run/systemd/private` without a bus daemon, is not offered: systemd signs its replies there
//! with its well-known name where the protocol has a unique name, which zbus rejects.
//!
//! Written on `zbus` (the maintained pure-Rust D-Bus implementation); the manager's interface is
//! four methods, called by name rather than through a generated proxy.

use std::time::Duration;

use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
/// The interface of a unit's generic properties (`ActiveState`).
pub const UNIT: &str = "org.freedesktop.systemd1.Unit";
/// The interface of a slice's properties (`ControlGroup`, resource settings).
pub const SLICE: &str = "org.freedesktop.systemd1.Slice";

/// Properties systemd takes only when it creates a transient unit (`SetUnitProperties` on an
/// existing unit refuses them with `PropertyReadOnly`).
const CREATION_ONLY: [&str; 5] = [
    "Wants",
    "Slice",
    "DefaultDependencies",
    "Description",
    "PIDs",
];

/// How long a started unit may take to become active before the caller goes on without it (as
/// libcontainer goes on after its own wait).
const ACTIVATION_WAIT: Duration = Duration::from_secs(1);

/// Why the manager could not be reached or did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("connect to systemd at {at}")]
    Connect {
        at: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("systemd {method} {unit}")]
    Call {
        method: &'static str,
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
}

impl SystemdError {
    /// The D-Bus error name systemd answered with (`org.freedesktop.systemd1.NoSuchUnit`), if
    /// the call reached it.
    pub fn dbus_name(&self) -> Option<&str> {
        match self {
            SystemdError::Call { source, .. } => match &**source {
                zbus::Error::MethodError(name, _, _) => Some(name.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The value of a unit property, in the D-Bus type systemd expects for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `b`
    Bool(bool),
    /// `t` (`u64::MAX` is systemd's "infinity")
    U64(u64),
    /// `s`
    Str(String),
    /// `as`
    Strs(Vec<String>),
}

impl Value {
    fn variant(&self) -> Variant<'_> {
        match self {
            Value::Bool(b) => Variant::Bool(*b),
            Value::U64(n) => Variant::U64(*n),
            Value::Str(s) => Variant::from(s.as_str()),
            Value::Strs(v) => Variant::from(v.iter().map(String::as_str).collect::<Vec<_>>()),
        }
    }
}

/// `properties` as D-Bus `a(sv)` entries.
fn variants(properties: &[Property]) -> Vec<(&'static str, Variant<'_>)> {
    properties
        .iter()
        .map(|p| (p.name, p.value.variant()))
        .collect()
}

/// One property of a transient unit (`MemoryMax`, `CPUWeight`, `Wants`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Property {
    pub name: &'static str,
    pub value: Value,
}

impl Property {
    pub fn new(name: &'static str, value: Value) -> Self {
        Property { name, value }
    }
}

/// A connection to one systemd manager, through a bus daemon.
#[derive(Clone, Debug)]
pub struct Systemd {
    conn: Connection,
}

impl Systemd {
    /// The system manager, on the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else
    /// `/run/dbus/system_bus_socket`).
    pub async fn connect() -> Result<Self, SystemdError> {
        let conn = zbus::connection::Builder::system()
            .build()
            .await
            .map_err(|source| SystemdError::Connect {
                at: "the system bus".into(),
                source: Box::new(source),
            })?;
        Ok(Systemd { conn })
    }

    /// The manager on the bus at D-Bus address `address` (`unix:path=...`; a user manager's
    /// `$XDG_RUNTIME_DIR/bus` in tests).
    pub async fn connect_bus(address: &str) -> Result<Self, SystemdError> {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .map_err(|source| SystemdError::Connect {
                at: address.to_string(),
                source: Box::new(source),
            })?;
        Ok(Systemd { conn })
    }

    async fn call<B>(
        &self,
        path: &str,
        interface: &str,
        method: &'static str,
        unit: &str,
        body: &B,
    ) -> Result<zbus::Message, SystemdError>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        self.conn
            .call_method(Some(DESTINATION), path, Some(interface), method, body)
            .await
            .map_err(|source| SystemdError::Call {
                method,
                unit: unit.to_string(),
                source: Box::new(source),
            })
    }

    /// Starts transient unit `name` with `properties` and waits (briefly) for it to be active;
    /// a unit of that name that already exists gets those of the properties that can change
    /// (runtime, not persisted), as libcontainer treats `UnitExists`.
    pub async fn start_transient_unit(
        &self,
        name: &str,
        properties: &[Property],
    ) -> Result<(), SystemdError> {
        let props = variants(properties);
        let aux: Vec<(&str, Vec<(&str, Variant<'_>)>)> = Vec::new();
        let started = self
            .call(
                MANAGER_PATH,
                MANAGER,
                "StartTransientUnit",
                name,
                &(name, "replace", props, aux),
            )
            .await;
        match started {
            Ok(_) => {
                self.wait_active(name).await;
                Ok(())
            }
            Err(e) if e.dbus_name() == Some("org.freedesktop.systemd1.UnitExists") => {
                let settable: Vec<Property> = properties
                    .iter()
                    .filter(|p| !CREATION_ONLY.contains(&p.name))
                    .cloned()
                    .collect();
                self.set_unit_properties(name, &settable).await
            }
            Err(e) => Err(e),
        }
    }

    /// Sets `properties` on unit `name` for as long as the manager runs.
    pub async fn set_unit_properties(
        &self,
        name: &str,
        properties: &[Property],
    ) -> Result<(), SystemdError> {
        let props = variants(properties);
        self.call(
            MANAGER_PATH,
            MANAGER,
            "SetUnitProperties",
            name,
            &(name, true, props),
        )
        .await
        .map(|_| ())
    }

    /// Stops unit `name`; one that does not exist is already stopped.
    pub async fn stop_unit(&self, name: &str) -> Result<(), SystemdError> {
        match self
            .call(MANAGER_PATH, MANAGER, "StopUnit", name, &(name, "replace"))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.dbus_name() == Some("org.freedesktop.systemd1.NoSuchUnit") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Property `property` of `interface` on the manager itself (`ControlGroup`, `Version`).
    pub async fn manager_property(&self, property: &str) -> Result<OwnedVariant, SystemdError> {
        self.property(MANAGER_PATH, MANAGER, property, "manager")
            .await
    }

    /// Property `property` of `interface` on loaded unit `name`; `None` when no such unit is
    /// loaded.
    pub async fn unit_property(
        &self,
        name: &str,
        interface: &str,
        property: &str,
    ) -> Result<Option<OwnedVariant>, SystemdError> {
        let reply = match self
            .call(MANAGER_PATH, MANAGER, "GetUnit", name, &(name,))
            .await
        {
            Ok(r) => r,
            Err(e) if e.dbus_name() == Some("org.freedesktop.systemd1.NoSuchUnit") => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let path: OwnedObjectPath =
            reply
                .body()
                .deserialize()
                .map_err(|source| SystemdError::Call {
                    method: "GetUnit",
                    unit: name.to_string(),
                    source: Box::new(source),
                })?;
        self.property(path.as_str(), interface, property, name)
            .await
            .map(Some)
    }

    async fn property(
        &self,
        path: &str,
        interface: &str,
        property: &str,
        unit: &str,
    ) -> Result<OwnedVariant, SystemdError> {
        let reply = self
            .call(path, PROPERTIES, "Get", unit, &(interface, property))
            .await?;
        reply
            .body()
            .deserialize::<OwnedVariant>()
            .map_err(|source| SystemdError::Call {
                method: "Get",
                unit: unit.to_string(),
                source: Box::new(source),
            })
    }

    /// The cgroup the manager itself manages, relative to the hierarchy's root: "" for the
    /// system manager, the user manager's own cgroup for a user manager.
    pub async fn control_group(&self) -> Result<String, SystemdError> {
        let v = self.manager_property("ControlGroup").await?;
        Ok(string_of(&v).unwrap_or_default())
    }

    async fn wait_active(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + ACTIVATION_WAIT;
        loop {
            let state = self.unit_property(name, UNIT, "ActiveState").await;
            if let Ok(Some(v)) = &state
                && string_of(v).as_deref() == Some("active")
            {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(unit = name, "systemd unit not active after 1s; going on");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The string inside a property value of type `s`.
pub fn string_of(v: &OwnedVariant) -> Option<String> {
    match &**v {
        Variant::Str(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The number inside a property value of type `t`.
pub fn u64_of(v: &OwnedVariant) -> Option<u64> {
    match &**v {
        Variant::U64(n) => Some(*n),
        _ => None,
    }
}
