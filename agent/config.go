package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"github.com/gwagent/gwagent/agent/network"
	"github.com/gwagent/gwagent/internal/duration"
	"github.com/gwagent/gwagent/internal/tomlconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/renewal"
	"github.com/gwagent/gwagent/telemetry"
)

// Config is gwagent's configuration file (TOML). Decoding is strict: an
// unknown key is an error naming its line, so a typo never silently falls
// back to a default. configs/gwagent.toml is the commented example.
type Config struct {
	// StateDir holds keys (for file: and blob keys), the identity store and
	// the outbox. systemd's StateDirectory= gives /var/lib/gwagent.
	StateDir string `toml:"state_dir"`
	// TrustBundle is a PEM file of the CAs that sign DPS's and the hub's
	// server certificates.
	TrustBundle string `toml:"trust_bundle"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `toml:"log_level"`

	Identity    IdentityConfig    `toml:"identity"`
	Onboarding  OnboardingConfig  `toml:"onboarding"`
	Operational OperationalConfig `toml:"operational"`
	Hub         HubConfig         `toml:"hub"`
	Telemetry   TelemetryConfig   `toml:"telemetry"`
	Outbox      OutboxConfig      `toml:"outbox"`
	Renewal     RenewalConfig     `toml:"renewal"`
	Network     NetworkConfig     `toml:"network"` // agent/network

	// path is the file the config was loaded from.
	path string
}

// IdentityConfig says who the device is to DPS.
type IdentityConfig struct {
	IDScope        string `toml:"id_scope"`
	RegistrationID string `toml:"registration_id"`
	// DPSEndpoint is the DPS host[:port]; default
	// global.azure-devices-provisioning.net.
	DPSEndpoint string `toml:"dps_endpoint"`
	// APIVersion is DPS's api-version; default 2025-07-01-preview, the
	// first that issues certificates.
	APIVersion string `toml:"api_version"`
	// ProvisioningTimeout bounds one whole registration; default 5m.
	ProvisioningTimeout Duration `toml:"provisioning_timeout"`
	// DPSTransport is "mqtt" (port 8883) or "https" (port 443, the REST
	// API). Default: "https" for [onboarding] kind = "tpm" (DPS offers TPM
	// attestation over HTTPS only), else "mqtt".
	DPSTransport string `toml:"dps_transport"`
}

// OnboardingConfig is the factory credential DPS authenticates the device
// with: an X.509 certificate whose key is in a key store, a symmetric key,
// or the TPM's endorsement key (TPM attestation).
type OnboardingConfig struct {
	// Kind is "x509", "symmetric_key" or "tpm".
	Kind string `toml:"kind"`
	// TPM is the TPM whose endorsement key is the credential (tpm):
	// "tpm2:device=/dev/tpmrm0" (the default) or "tpm2:socket=PATH" (swtpm).
	TPM string `toml:"tpm"`
	// Key is the onboarding key URI (x509).
	Key string `toml:"key"`
	// Chain is the PEM file with the onboarding certificate and its
	// intermediates, leaf first (x509), as `gwagent onboard install` wrote it.
	Chain string `toml:"chain"`
	// SymmetricKeyFile holds the base64 key (symmetric_key). Keep it 0600.
	SymmetricKeyFile string `toml:"symmetric_key_file"`
	// GroupKey says the file holds the enrollment-group key, from which the
	// device key is derived for registration_id.
	GroupKey bool `toml:"group_key"`
}

// OperationalConfig is the key the operational certificate is issued for.
type OperationalConfig struct {
	// Key is the operational key URI. gwagent creates the key if it does
	// not exist when provisioning.
	Key string `toml:"key"`
}

// HubConfig tunes the IoT Hub session. Static mode (Host, DeviceID and
// Chain set) is for devices whose CA-signed certificate was installed at the
// factory and that connect to a known hub without DPS.
type HubConfig struct {
	// APIVersion is the hub api-version; default 2025-08-01-preview (the
	// certificate-signing API needs it).
	APIVersion string `toml:"api_version"`
	// KeepAlive is the MQTT keep-alive; default 240s (at most 1177s).
	KeepAlive Duration `toml:"keep_alive"`
	// Static mode: the hub host[:port], the device id and the PEM chain
	// (leaf first) for [operational] key. Leave empty to use DPS.
	Host     string `toml:"host"`
	DeviceID string `toml:"device_id"`
	Chain    string `toml:"chain"`
}

// TelemetryConfig is what the agent sends. Reloadable without restart.
type TelemetryConfig struct {
	// Interval between health messages; default 60s. The twin's desired
	// property telemetryInterval (seconds) overrides it.
	Interval Duration `toml:"interval"`
	// SpoolDir is watched for *.json files from local applications; each is
	// sent as one message and deleted after the hub acknowledged it.
	// Default: /var/spool/gwagent (group gwagent-spool may write it) when
	// state_dir is the default, else STATE_DIR/spool.
	SpoolDir string `toml:"spool_dir"`
	// SpoolSettle is how long a spool file must be unchanged before it is
	// read, so a file written in place in several chunks is not sent half
	// written; default 1s. Files renamed into place after writing have
	// usually settled already.
	SpoolSettle Duration `toml:"spool_settle"`
	// MaxRate is the send budget in messages per second (a packed message
	// counts as one); default DefaultMaxRate, 0: unlimited. The drain also
	// slows down on its own when the hub shapes or throttles, and speeds up
	// again. Reloadable.
	MaxRate *float64 `toml:"max_rate"`
	// Pack sends consecutive small spool messages with the same properties
	// as one JSON array message of at most PackBytes (as the hub meters
	// it), waiting at most PackWait for a pack to fill; default false,
	// 4096 and 5s. Reloadable.
	Pack      bool      `toml:"pack"`
	PackBytes int       `toml:"pack_bytes"`
	PackWait  *Duration `toml:"pack_wait"`
}

// DefaultMaxRate is [telemetry] max_rate's default: a tenth of what an S1
// hub with one unit takes from all its devices together (100 messages per
// second), so that a gateway draining a backlog leaves the rest to its
// fleet; configs/gwagent.toml and the README argue it.
const DefaultMaxRate = 10.0

// Rate is max_rate in effect.
func (t TelemetryConfig) Rate() float64 {
	if t.MaxRate == nil {
		return DefaultMaxRate
	}
	return *t.MaxRate
}

// OutboxConfig bounds the on-disk queue.
type OutboxConfig struct {
	// MaxBytes bounds queued messages; default 16777216 (16 MiB). When full,
	// the oldest health messages are dropped first; application messages
	// wait in the spool directory.
	MaxBytes int64 `toml:"max_bytes"`
}

// RenewalConfig says when and how the operational certificate is renewed.
type RenewalConfig struct {
	// Threshold is the share of the certificate's lifetime after which it
	// is renewed; default 0.8 (Microsoft's guidance).
	Threshold float64 `toml:"threshold"`
	// Jitter moves each certificate's renewal earlier by a random amount up
	// to Jitter (drawn once per certificate, stable across restarts), so a
	// fleet provisioned together does not renew together; default 6h.
	Jitter Duration `toml:"jitter"`
	// Floor: with less than this left, renew at once; default 1h.
	Floor Duration `toml:"floor"`
	// RetryMin and RetryMax bound the backoff between failed attempts
	// (defaults 30s and 1h); a retry is never planned later than a quarter
	// of the remaining lifetime, so several attempts fit before expiry.
	RetryMin Duration `toml:"retry_min"`
	RetryMax Duration `toml:"retry_max"`
	// Prefer is "hub" (the hub's certificate API while the certificate is
	// valid, DPS as fallback; default) or "dps" (always re-register).
	Prefer string `toml:"prefer"`
	// RotateKey makes every renewal use a new key; default true. false is
	// for PKCS#11 tokens that cannot hold a second key.
	RotateKey *bool `toml:"rotate_key"`
	// IssueTimeout bounds the wait for the hub's certificate after its 202;
	// default 3m. An answer arriving later, even on a later connection, is
	// still used.
	IssueTimeout Duration `toml:"issue_timeout"`
}

// Rotate reports whether renewals use a new key.
func (r RenewalConfig) Rotate() bool { return r.RotateKey == nil || *r.RotateKey }

// NetworkConfig is how the agent reaches DPS and IoT Hub (agent/network).
type NetworkConfig = network.Config

// Policy is the renewal schedule the config describes.
func (r RenewalConfig) Policy() renewal.Policy {
	return renewal.Policy{Threshold: r.Threshold, Jitter: r.Jitter.Duration, Floor: r.Floor.Duration}
}

// Duration is a time.Duration written as "90s", "5m", "1h30m" in TOML.
type Duration = duration.Duration

// DefaultStateDir is the state directory when the config names none
// (systemd's StateDirectory=gwagent).
const DefaultStateDir = "/var/lib/gwagent"

// DefaultSpoolDir is the spool directory when the config names none. It is
// outside the state directory so that local applications (group
// gwagent-spool) can write it without any access to keys and identity.
const DefaultSpoolDir = "/var/spool/gwagent"

// Onboarding kinds.
const (
	OnboardingX509         = "x509"
	OnboardingSymmetricKey = "symmetric_key"
	OnboardingTPM          = "tpm"
)

// ErrConfig marks configuration errors.
var ErrConfig = errors.New("config")

// LoadConfig reads, decodes strictly and validates a config file. Relative
// paths in it are taken relative to the file's directory.
func LoadConfig(path string) (*Config, error) {
	raw, err := tomlconf.Read(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %w; copy configs/gwagent.toml there and fill in id_scope and the keys, or pass --config FILE", ErrConfig, err)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("%w: %w; run as the gwagent user (sudo -u gwagent gwagent ...) or as root", ErrConfig, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return ParseConfig(path, raw)
}

// ParseConfig is LoadConfig on bytes already read from path.
func ParseConfig(path string, raw []byte) (*Config, error) {
	var c Config
	if err := tomlconf.Decode(path, raw, &c, "configs/gwagent.toml"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	c.path = path
	c.defaults()
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrConfig, path, err)
	}
	return &c, nil
}

func (c *Config) defaults() {
	base := filepath.Dir(c.path)
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	abs(&c.StateDir)
	abs(&c.TrustBundle)
	abs(&c.Onboarding.Chain)
	abs(&c.Onboarding.SymmetricKeyFile)
	abs(&c.Hub.Chain)
	c.Onboarding.Key = absKeyURI(base, c.Onboarding.Key)
	c.Operational.Key = absKeyURI(base, c.Operational.Key)
	if u, err := TPMDevice(c.Onboarding.TPM); err == nil && u.Attrs["socket"] != "" && !filepath.IsAbs(u.Attrs["socket"]) {
		c.Onboarding.TPM = "tpm2:socket=" + filepath.Join(base, u.Attrs["socket"])
	}
	if c.Telemetry.SpoolDir == "" {
		c.Telemetry.SpoolDir = DefaultSpoolDir
		if c.StateDir != DefaultStateDir {
			// A private setup (tests, demos, a second instance): keep it
			// beside its state, not in the system-wide spool.
			c.Telemetry.SpoolDir = filepath.Join(c.StateDir, "spool")
		}
	}
	abs(&c.Telemetry.SpoolDir)
	if c.Telemetry.SpoolSettle.Duration == 0 {
		c.Telemetry.SpoolSettle.Duration = time.Second
	}
	if c.Telemetry.Interval.Duration == 0 {
		c.Telemetry.Interval.Duration = time.Minute
	}
	if c.Telemetry.PackBytes == 0 {
		c.Telemetry.PackBytes = telemetry.DefaultPackBytes
	}
	if c.Telemetry.PackWait == nil {
		c.Telemetry.PackWait = &Duration{Duration: 5 * time.Second}
	}
	if c.Hub.KeepAlive.Duration == 0 {
		c.Hub.KeepAlive.Duration = 240 * time.Second
	}
	if c.Hub.APIVersion == "" {
		c.Hub.APIVersion = "2025-08-01-preview"
	}
	if c.Outbox.MaxBytes == 0 {
		c.Outbox.MaxBytes = 16 << 20
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	r := &c.Renewal
	def := renewal.DefaultPolicy()
	if r.Threshold == 0 {
		r.Threshold = def.Threshold
	}
	if r.Jitter.Duration == 0 {
		r.Jitter.Duration = def.Jitter
	}
	if r.Floor.Duration == 0 {
		r.Floor.Duration = def.Floor
	}
	if r.RetryMin.Duration == 0 {
		r.RetryMin.Duration = 30 * time.Second
	}
	if r.RetryMax.Duration == 0 {
		r.RetryMax.Duration = time.Hour
	}
	if r.Prefer == "" {
		r.Prefer = "hub"
	}
	if r.IssueTimeout.Duration == 0 {
		r.IssueTimeout.Duration = 3 * time.Minute
	}
	c.Network.Defaults()
	if c.Identity.DPSEndpoint == "" {
		c.Identity.DPSEndpoint = "global.azure-devices-provisioning.net"
	}
	if c.Identity.APIVersion == "" {
		c.Identity.APIVersion = provisioning.DefaultAPIVersion
	}
	if c.Identity.ProvisioningTimeout.Duration == 0 {
		c.Identity.ProvisioningTimeout.Duration = 5 * time.Minute
	}
	if c.Onboarding.Kind == OnboardingTPM && c.Onboarding.TPM == "" {
		c.Onboarding.TPM = "tpm2:device=/dev/tpmrm0"
	}
	if c.Identity.DPSTransport == "" {
		c.Identity.DPSTransport = provisioning.TransportMQTT
		if c.Onboarding.Kind == OnboardingTPM {
			c.Identity.DPSTransport = provisioning.TransportHTTPS
		}
	}
}

// absKeyURI makes the file paths in a key URI (file: path, tpm2 blob and
// socket, pkcs11 pin-source and a module-path with a '/') absolute, relative to base: the
// config file's directory, not the working directory. An unparsable or
// already absolute URI is returned unchanged (validate reports the former).
func absKeyURI(base, raw string) string {
	u, err := keystore.Parse(raw)
	if err != nil {
		return raw
	}
	changed := false
	fix := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		changed = true
		return filepath.Join(base, p)
	}
	switch u.Scheme {
	case keystore.SchemeFile:
		u.Path = fix(u.Path)
	case keystore.SchemeTPM2:
		for _, k := range []string{"blob", "socket"} {
			if v, ok := u.Attrs[k]; ok {
				u.Attrs[k] = fix(v)
			}
		}
	case keystore.SchemePKCS11:
		if v, ok := u.Query["pin-source"]; ok {
			u.Query["pin-source"] = fix(v)
		}
		// A bare library name is for the dynamic loader's search path.
		if v, ok := u.Query["module-path"]; ok && strings.Contains(v, "/") {
			u.Query["module-path"] = fix(v)
		}
	}
	if !changed {
		return raw
	}
	return u.Secret()
}

func (c *Config) validate() error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	errs = append(errs, c.Network.Validate()...)
	if c.TrustBundle == "" {
		add("trust_bundle is required: the PEM file of CAs that sign DPS's and IoT Hub's server certificates")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		add("log_level %q: use debug, info, warn or error", c.LogLevel)
	}
	if d := c.Telemetry.Interval.Duration; d < time.Second {
		add("[telemetry] interval %s is below 1s", d)
	}
	if d := c.Telemetry.SpoolSettle.Duration; d < 0 || d > time.Hour {
		add("[telemetry] spool_settle %s: use 0s to 1h", d)
	}
	if r := c.Telemetry.Rate(); r < 0 || r > 100000 {
		add("[telemetry] max_rate %g: use messages per second from 0.01 to 100000, or 0 for unlimited", r)
	} else if r > 0 && r < 0.01 {
		add("[telemetry] max_rate %g is below 0.01 messages per second (one every 100 s); use 0 for unlimited", r)
	}
	if b := c.Telemetry.PackBytes; b < 512 || b > telemetry.MaxMessageBytes {
		add("[telemetry] pack_bytes %d: use 512 (a quota chunk on an F1 hub) to %d; 4096 is a chunk on the other tiers", b, telemetry.MaxMessageBytes)
	}
	if d := c.Telemetry.PackWait.Duration; d < 0 || d > time.Minute {
		add("[telemetry] pack_wait %s: use 0s to 1m", d)
	}
	if c.Telemetry.SpoolDir == c.StateDir {
		add("[telemetry] spool_dir must not be the state directory: local applications write the spool, and must not reach keys, identity or outbox")
	}
	if d := c.Hub.KeepAlive.Duration; d < 30*time.Second || d > 1177*time.Second {
		add("[hub] keep_alive %s: use 30s to 1177s (the hub allows at most 1177s)", d)
	}
	if c.Outbox.MaxBytes < 64<<10 {
		add("[outbox] max_bytes %d is below 65536", c.Outbox.MaxBytes)
	}
	r := c.Renewal
	if r.Threshold < 0.5 || r.Threshold > 0.95 {
		add("[renewal] threshold %g: use 0.5 to 0.95 (0.8 is Microsoft's guidance)", r.Threshold)
	}
	if r.Jitter.Duration < 0 || r.Floor.Duration < 0 || r.RetryMin.Duration <= 0 || r.RetryMax.Duration < r.RetryMin.Duration {
		add("[renewal] jitter and floor must not be negative, and 0 < retry_min <= retry_max")
	}
	if r.Prefer != "hub" && r.Prefer != "dps" {
		add("[renewal] prefer %q: use \"hub\" or \"dps\"", r.Prefer)
	}
	if !r.Rotate() {
		if u, err := keystore.Parse(c.Operational.Key); err == nil && u.Scheme != keystore.SchemePKCS11 {
			add("[renewal] rotate_key = false is only for PKCS#11 tokens that cannot hold a second key; %s keys can always be rotated, so remove it", u.Scheme)
		}
	}
	if c.Static() {
		if c.Hub.Host == "" || c.Hub.DeviceID == "" || c.Hub.Chain == "" {
			add("[hub] static mode needs host, device_id and chain together")
		}
		if _, err := keystore.Parse(c.Operational.Key); err != nil {
			add("[operational] key: %v", err)
		}
		return errors.Join(errs...)
	}
	if c.Identity.IDScope == "" {
		add("[identity] id_scope is required (DPS overview page, e.g. 0ne00000000)")
	}
	// With TPM attestation the registration id may be left out: it is then
	// derived from the endorsement key as the Azure SDKs do.
	if c.Onboarding.Kind != OnboardingTPM || c.Identity.RegistrationID != "" {
		if err := provisioning.ValidateRegistrationID(c.Identity.RegistrationID); err != nil {
			add("[identity] registration_id: %v", err)
		}
	}
	switch c.Identity.DPSTransport {
	case provisioning.TransportMQTT, provisioning.TransportHTTPS:
	default:
		add("[identity] dps_transport %q: use \"mqtt\" or \"https\"", c.Identity.DPSTransport)
	}
	if c.Onboarding.Kind != OnboardingTPM && c.Onboarding.TPM != "" {
		add("[onboarding] tpm is for kind = \"tpm\"; remove it or change kind")
	}
	switch c.Onboarding.Kind {
	case OnboardingX509:
		if _, err := keystore.Parse(c.Onboarding.Key); err != nil {
			add("[onboarding] key: %v", err)
		}
		if c.Onboarding.Chain == "" {
			add("[onboarding] chain is required for kind = \"x509\" (the file `gwagent onboard install` writes)")
		}
		if c.Onboarding.SymmetricKeyFile != "" {
			add("[onboarding] symmetric_key_file is for kind = \"symmetric_key\"; remove it or change kind")
		}
	case OnboardingSymmetricKey:
		if c.Onboarding.SymmetricKeyFile == "" {
			add("[onboarding] symmetric_key_file is required for kind = \"symmetric_key\"")
		}
		if c.Onboarding.Key != "" || c.Onboarding.Chain != "" {
			add("[onboarding] key and chain are for kind = \"x509\"; remove them or change kind")
		}
	case OnboardingTPM:
		if _, err := TPMDevice(c.Onboarding.TPM); err != nil {
			add("[onboarding] tpm: %v", err)
		}
		if c.Onboarding.Key != "" || c.Onboarding.Chain != "" || c.Onboarding.SymmetricKeyFile != "" {
			add("[onboarding] key, chain and symmetric_key_file are not used with kind = \"tpm\" (the TPM's endorsement key is the credential); remove them")
		}
		if c.Identity.DPSTransport == provisioning.TransportMQTT {
			add("[identity] dps_transport = \"mqtt\" cannot carry TPM attestation (DPS offers it over HTTPS only); use \"https\" or leave it out")
		}
	case "":
		add("[onboarding] kind is required: \"x509\", \"symmetric_key\" or \"tpm\"")
	default:
		add("[onboarding] kind %q: use \"x509\", \"symmetric_key\" or \"tpm\"", c.Onboarding.Kind)
	}
	if u, err := keystore.Parse(c.Operational.Key); err != nil {
		add("[operational] key: %v", err)
	} else if c.Onboarding.Key != "" && u.String() == mustString(c.Onboarding.Key) {
		add("[operational] key must differ from [onboarding] key: the onboarding key proves the device's origin and is never replaced")
	}
	return errors.Join(errs...)
}

func mustString(raw string) string {
	u, err := keystore.Parse(raw)
	if err != nil {
		return raw
	}
	return u.String()
}

// Static reports whether the config names a factory-installed certificate
// and a known hub ([hub] host/device_id/chain) instead of DPS.
func (c *Config) Static() bool {
	return c.Hub.Host != "" || c.Hub.DeviceID != "" || c.Hub.Chain != ""
}

// Path is the file the config was loaded from.
func (c *Config) Path() string { return c.path }

// TPMDevice parses [onboarding] tpm: "tpm2:device=PATH" or
// "tpm2:socket=PATH", into a key-store URI that opens that TPM.
func TPMDevice(raw string) (*keystore.URI, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(raw), keystore.SchemeTPM2+":")
	k, v, ok2 := strings.Cut(rest, "=")
	if !ok || !ok2 || (k != "device" && k != "socket") || v == "" || strings.Contains(v, ";") {
		return nil, fmt.Errorf("%q: use tpm2:device=/dev/tpmrm0 or tpm2:socket=/path/to/swtpm.sock", raw)
	}
	return &keystore.URI{Scheme: keystore.SchemeTPM2, Attrs: map[string]string{k: v}}, nil
}
