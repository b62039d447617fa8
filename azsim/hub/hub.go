// Package hub is azsim's IoT Hub: the device-facing MQTT endpoint of Azure
// IoT Hub, played on an embedded mochi-mqtt broker, plus the hub's device
// identity registry (it implements identity.Registrar for azsim's DPS), device
// twins, direct methods, cloud-to-device messages, the $iothub/credentials
// certificate-renewal API, CA registration with proof of possession and the
// telemetry log. It is imported by package azsim (the wiring) and by tests;
// nothing of the agent's may import it.
//
// Wire behaviour follows Microsoft Learn ("Communicate with an IoT hub using
// the MQTT protocol", "Transport Layer Security support in IoT Hub") and the
// SDKs; docs/azure-fidelity.md lists the sources and what is not emulated:
//
//   - TLS 1.2 with the ECDHE suites Azure keeps; the client certificate is
//     requested in the handshake and judged at CONNECT, as the real hub does.
//   - CONNECT: client id = device id; username
//     {hostName}/{deviceId}/?api-version=...[&more]; X.509 devices present
//     their full chain (leaf CN = device id) that must verify to the issuer's
//     CAs or to a CA registered and verified at the hub, self-signed devices
//     are matched by SHA-256 or SHA-1 thumbprint, symmetric-key devices send
//     a hub SAS token as password. Unknown device or failed authentication:
//     CONNACK 5; disabled device or injected refusal: CONNACK 3; MQTT other
//     than 3.1.1: CONNACK 1. A new connection for a device drops the old one.
//   - Telemetry on devices/{id}/messages/events/{property bag}; QoS 2, more
//     than 256 KiB of payload, or a topic the device may not publish to
//     closes the connection. At most five subscriptions, only the documented
//     filters; QoS 2 subscriptions are granted QoS 1.
//   - Twin, direct methods, C2D (queued while the device is away if its last
//     session was persistent, CleanSession=0) and the certificate-renewal API
//     (202, then 200 with the chain after Config.IssueDelay).
//
// Telemetry log: with Config.TelemetryLog set, each device-to-cloud message
// (and each Will forwarded as telemetry) is appended as one JSON line:
//
//	{"deviceId":"d1","topic":"devices/d1/messages/events/%24.ct=...",
//	 "properties":{"system":{"$.ct":"application/json"},"application":{"k":"v"}},
//	 "body":{...},"receivedAt":"2025-01-01T00:00:00Z"}
//
// system holds the "$."-prefixed keys of the property bag, URL-decoded, under
// their wire names; application holds the others (a key without "=" maps to
// null). body is the JSON value when the payload is valid JSON, otherwise the
// payload as a string, or base64 with "bodyEncoding":"base64" when it is not
// UTF-8.
//
// State (registry, twins, registered CAs, current certificates) lives in
// StateDir/hub.json, written atomically after every change. Persistent MQTT
// sessions (CleanSession=0: subscriptions, C2D messages not yet
// acknowledged) live in StateDir/sessions.json, the day's quota use in
// StateDir/quota.json; a damaged one of these two is dropped with a warning
// (Warnings) instead of stopping the hub. Renewal operations in flight are
// kept in memory only.
package hub

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/identity"
)

// Config configures a Hub. TLS and Issuer are required.
type Config struct {
	// Addr is the listen address, e.g. "127.0.0.1:8884"; ":0" picks a port.
	Addr string
	// WSAddr, if set, also serves MQTT over WebSockets (Azure's port 443).
	WSAddr string
	// HostName is the hub's name as devices dial it. Empty: derived from the
	// bound listener, "localhost:PORT", or "localhost" on port 8883.
	HostName string
	// TLS carries the server certificate(s). The hub sets ClientAuth and the
	// protocol limits itself (TLS 1.2 and Azure's suites unless MinVersion,
	// MaxVersion or CipherSuites are set) and verifies client chains at CONNECT.
	TLS *tls.Config
	// Issuer is the trusted issuing CA and the signer of the renewal API.
	Issuer identity.Issuer
	// CertLifetime is the lifetime of certificates issued through the renewal
	// API. Zero means 30 days.
	CertLifetime time.Duration
	// StateDir is where the hub keeps hub.json. Empty: nothing is persisted.
	StateDir string
	// TelemetryLog, if not nil, receives one JSON object per device-to-cloud
	// message, written with a single Write call and flushed (if it has a
	// Flush() error method) per message.
	TelemetryLog io.Writer
	// Faults, if not nil, can refuse connections and answer twin and
	// credentials requests with errors.
	Faults *faults.Injector
	// Now is the clock for certificate validity, SAS expiry and timestamps.
	// Nil means time.Now.
	Now func() time.Time
	// IssueDelay is how long the renewal API waits between its 202 and the
	// 200 with the certificate. Zero means 1s; negative means no delay.
	IssueDelay time.Duration
	// RejectInHandshake judges client certificates inside the TLS handshake
	// as far as the hub can without the CONNECT (validity, a chain to a
	// trusted CA or a registered thumbprint) and refuses bad ones with a
	// bad_certificate alert instead of CONNACK 5. Certificates named by
	// Faults.RejectCertificate are refused in the handshake either way.
	RejectInHandshake bool
	// NoCertificateManagement plays a hub without the certificate-signing
	// API (a tier or region without it): SUBACK 0x80 for
	// $iothub/credentials/res/#, and a publish to $iothub/credentials/...
	// closes the connection like any topic the device may not use.
	NoCertificateManagement bool
	// CredentialSyncLag plays Azure pushing a device's new credential to the
	// hub asynchronously: for this long after DPS registers a device, a
	// certificate from the issuing CA that the hub has not accepted before
	// is refused with CONNACK 5. Zero: no lag.
	CredentialSyncLag time.Duration
	// ConnectRate is how many CONNECTs per second the hub accepts in all
	// (Azure throttles connection attempts per unit); beyond it CONNACK 3.
	// Zero: no limit.
	ConnectRate int
	// TwinRate is how many twin operations (GET, reported PATCH) per second
	// the hub serves in all; beyond it 429 with retry-after. Zero: no limit.
	TwinRate int
	// Tier names the hub's tier and units for the admin API (TierLimits
	// gives the figures for the fields below); informational.
	Tier Tier
	// D2CRate is how many device-to-cloud messages per second the hub
	// takes in all (Learn's "device-to-cloud sends" throttle), with traffic
	// shaping: the first D2CBurst above the rate are taken at once, later
	// ones are held (their PUBACK comes late) and taken at the rate, and a
	// message that would be held longer than D2CBacklog closes the
	// connection without PUBACK (429002). Zero: no throttle.
	D2CRate int
	// D2CBurst is the burst allowance in messages; zero means D2CRate (one
	// second's worth).
	D2CBurst int
	// D2CBacklog is the longest a message is held; zero means 10 s.
	D2CBacklog time.Duration
	// DailyQuota is the hub's daily message quota in QuotaChunk-byte
	// chunks (device-to-cloud messages, twin reads and updates, C2D and
	// direct methods are charged). Once used up, a telemetry PUBLISH or a
	// twin request closes the connection without an answer (403002) and the
	// admin API refuses C2D and methods, until 00:00 UTC by the quota clock
	// (the hub's clock plus an offset the admin API moves). The day's use
	// is kept in StateDir/quota.json. Zero: no quota.
	DailyQuota int64
	// QuotaChunk is the metering chunk: 4096 bytes (zero), 512 on Free.
	QuotaChunk int
}

const (
	defaultCertLifetime = 30 * 24 * time.Hour
	defaultIssueDelay   = time.Second
	// handshakeTimeout bounds the TLS handshake and the wait for CONNECT, so
	// a silent client cannot hold a connection slot forever.
	handshakeTimeout = 30 * time.Second
	// defaultD2CBacklog: Learn documents no size for the shaping queue;
	// ten seconds of waiting is azsim's (hard) choice.
	defaultD2CBacklog = 10 * time.Second
	// quotaSaveEvery is how often the day's quota use is written to disk.
	quotaSaveEvery = 5 * time.Second
)

// Hub is one emulated IoT Hub. Create it with New, then Start; Close stops
// it. All methods are safe for concurrent use.
type Hub struct {
	cfg        Config
	now        func() time.Time
	issueDelay time.Duration
	tlsConf    *tls.Config
	store      *store // nil when StateDir is empty

	srv *mqtt.Server
	ln  *broker.Listener
	wsl *broker.WebSocketListener

	ctx    context.Context // canceled by Close; ends timers and waits
	cancel context.CancelFunc
	wg     sync.WaitGroup // goroutines the hub started (renewals, ...)

	saveMu sync.Mutex // serializes snapshots to disk, taken before mu

	mu       sync.Mutex
	hostName string
	started  bool
	closed   bool
	devices  map[string]*device // by device id
	cas      map[string]*caRecord
	conns    map[*mqtt.Client]*conn
	methods  map[methodKey]chan methodResult
	nextRID  uint64

	logMu sync.Mutex // serializes telemetry log writes

	connects, twinOps *broker.Window // Config.ConnectRate, Config.TwinRate

	sessions *sessionStore // nil when StateDir is empty

	shaper *d2cShaper // nil without Config.D2CRate
	d2cQ   *d2cQueue
	quota  *quota // nil without Config.DailyQuota

	// warnings: state New could not load and dropped (see Warnings).
	warnings []string
}

// New validates cfg, loads the persisted state from cfg.StateDir and returns
// a Hub that is not yet listening.
func New(cfg Config) (*Hub, error) {
	if cfg.TLS == nil || (len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil && cfg.TLS.GetConfigForClient == nil) {
		return nil, errors.New("hub new: Config.TLS has no server certificate; pass the TLS server certificate from azsim's PKI")
	}
	if cfg.Issuer == nil {
		return nil, errors.New("hub new: Config.Issuer is nil; pass azsim's issuing CA (it signs renewals and is trusted for device certificates)")
	}
	if cfg.Addr == "" {
		return nil, errors.New("hub new: Config.Addr is empty; give a listen address such as 127.0.0.1:8883")
	}
	if cfg.CertLifetime == 0 {
		cfg.CertLifetime = defaultCertLifetime
	}
	if cfg.CertLifetime < 0 {
		return nil, fmt.Errorf("hub new: Config.CertLifetime %v is negative; give a positive lifetime", cfg.CertLifetime)
	}
	if cfg.D2CRate < 0 || cfg.D2CBurst < 0 || cfg.D2CBacklog < 0 || cfg.DailyQuota < 0 || cfg.QuotaChunk < 0 {
		return nil, errors.New("hub new: D2CRate, D2CBurst, D2CBacklog, DailyQuota and QuotaChunk must not be negative (zero turns a limit off or picks the default)")
	}
	if cfg.D2CBurst == 0 {
		cfg.D2CBurst = cfg.D2CRate
	}
	if cfg.D2CBacklog == 0 {
		cfg.D2CBacklog = defaultD2CBacklog
	}
	if cfg.QuotaChunk == 0 {
		cfg.QuotaChunk = 4096
	}
	h := &Hub{
		cfg:        cfg,
		now:        cfg.Now,
		issueDelay: cfg.IssueDelay,
		devices:    map[string]*device{},
		cas:        map[string]*caRecord{},
		conns:      map[*mqtt.Client]*conn{},
		methods:    map[methodKey]chan methodResult{},
	}
	if h.now == nil {
		h.now = time.Now
	}
	switch {
	case h.issueDelay == 0:
		h.issueDelay = defaultIssueDelay
	case h.issueDelay < 0:
		h.issueDelay = 0
	}
	h.connects = &broker.Window{N: cfg.ConnectRate, Per: time.Second}
	h.twinOps = &broker.Window{N: cfg.TwinRate, Per: time.Second}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	h.tlsConf = serverTLS(cfg.TLS)
	h.tlsConf.VerifyPeerCertificate = h.verifyInHandshake

	if cfg.D2CRate > 0 {
		h.shaper, h.d2cQ = newShaper(cfg.D2CRate, cfg.D2CBurst, cfg.D2CBacklog), newD2CQueue()
	}
	if cfg.StateDir != "" {
		st, err := openStore(cfg.StateDir)
		if err != nil {
			return nil, fmt.Errorf("hub new: %w", err)
		}
		h.store = st
		if err := h.load(); err != nil {
			return nil, fmt.Errorf("hub new: %w", err)
		}
		h.loadSessions(cfg.StateDir)
	}
	if cfg.DailyQuota > 0 {
		var warn string
		h.quota, warn = newQuota(cfg.DailyQuota, cfg.QuotaChunk, h.now, cfg.StateDir)
		if warn != "" {
			h.warnings = append(h.warnings, warn)
		}
	}
	return h, nil
}

// Warnings lists the state New found damaged and dropped so that the hub
// could start anyway (e.g. "quota.json is damaged ..."); the caller shows
// them to the operator.
func (h *Hub) Warnings() []string { return append([]string(nil), h.warnings...) }

// serverTLS derives the hub's listener configuration from the caller's.
func serverTLS(in *tls.Config) *tls.Config {
	c := in.Clone()
	// Like the real hub: ask for the certificate in the first handshake,
	// judge it at CONNECT (the right chain depends on the device record).
	// crypto/tls still checks the client's CertificateVerify, so a presented
	// leaf always comes with proof of its key.
	c.ClientAuth = tls.RequestClientCert
	if c.MinVersion < tls.VersionTLS12 {
		c.MinVersion = tls.VersionTLS12
	}
	if c.MaxVersion == 0 {
		// The classic hub endpoint speaks TLS 1.2 only; TLS 1.3 is a preview
		// on another host name. An agent must work with 1.2.
		c.MaxVersion = tls.VersionTLS12
	}
	if c.CipherSuites == nil {
		c.CipherSuites = []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
		}
	}
	return c
}

// Start binds Config.Addr and starts serving in the background. HostName is
// valid once Start has returned.
func (h *Hub) Start() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return errors.New("hub start: hub is closed; create a new one with hub.New")
	}
	if h.started {
		return errors.New("hub start: already started")
	}
	nl, err := net.Listen("tcp", h.cfg.Addr)
	if err != nil {
		return fmt.Errorf("hub start: listen on %s: %w (is another azsim or broker using the port? pick another with --hub-addr)", h.cfg.Addr, err)
	}
	srv := mqtt.New(&mqtt.Options{
		Capabilities: capabilities(),
		// The library logs; a library of ours must not.
		Logger:                 slog.New(slog.DiscardHandler),
		SysTopicResendInterval: 3600,
	})
	if err := srv.AddHook(&hook{h: h}, nil); err != nil {
		nl.Close()
		return fmt.Errorf("hub start: %w", err)
	}
	ln := broker.New("iothub", nl, h.tlsConf, handshakeTimeout)
	if err := srv.AddListener(ln); err != nil {
		nl.Close()
		return fmt.Errorf("hub start: %w", err)
	}
	if h.cfg.WSAddr != "" {
		if h.wsl, err = broker.ListenWebSocket(srv, "iothub-ws", h.cfg.WSAddr, h.tlsConf, handshakeTimeout); err != nil {
			nl.Close()
			return fmt.Errorf("hub start: %w", err)
		}
	}
	if err := srv.Serve(); err != nil {
		nl.Close()
		return fmt.Errorf("hub start: %w", err)
	}
	h.srv, h.ln = srv, ln
	if h.d2cQ != nil {
		h.goLocked(h.runShaped)
	}
	if h.quota != nil {
		h.goLocked(func() {
			t := time.NewTicker(quotaSaveEvery)
			defer t.Stop()
			for {
				select {
				case <-h.ctx.Done():
					return
				case <-t.C:
					_ = h.quota.save()
				}
			}
		})
	}
	h.hostName = h.cfg.HostName
	if h.hostName == "" {
		h.hostName = defaultHostName(nl.Addr())
	}
	h.started = true
	return nil
}

func capabilities() *mqtt.Capabilities {
	c := mqtt.NewDefaultServerCapabilities()
	// QoS 2 PUBLISHes close the connection before this matters; it makes
	// QoS 2 subscriptions come back granted at QoS 1 as the hub does.
	c.MaximumQos = 1
	// Guard memory: the 256 KiB message limit is checked exactly per
	// PUBLISH; anything far beyond it is cut off while reading.
	c.MaximumPacketSize = 2*maxD2CPayload + 64*1024
	c.MaximumClientWritesPending = 1024
	return c
}

func defaultHostName(a net.Addr) string {
	ta, ok := a.(*net.TCPAddr)
	if !ok || ta.Port == 0 {
		return "localhost"
	}
	d := DialAddr(ta)
	if ta.Port == 8883 {
		d, _, _ = net.SplitHostPort(d)
	}
	return d
}

// DialAddr is how a client on this machine dials a bound listener:
// "localhost:PORT" for 127.0.0.1, ::1 or an unspecified address (azsim's
// TLS certificates name localhost), otherwise the bound IP itself (e.g.
// 127.0.0.2:PORT, which then has to be in the certificate's server names).
func DialAddr(a *net.TCPAddr) string {
	host := "localhost"
	if !a.IP.IsUnspecified() && !a.IP.Equal(net.IPv4(127, 0, 0, 1)) && !a.IP.Equal(net.IPv6loopback) {
		host = a.IP.String()
	}
	return net.JoinHostPort(host, strconv.Itoa(a.Port))
}

// Config is the configuration the hub was created with (a second hub can
// be made like it).
func (h *Hub) Config() Config { return h.cfg }

// HostName is the hub's address as devices dial it, e.g. "localhost:8884".
// It implements identity.Registrar. Before Start it returns Config.HostName.
func (h *Hub) HostName() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.hostName == "" {
		return h.cfg.HostName
	}
	return h.hostName
}

// Addr is the bound listen address (nil before Start).
func (h *Hub) Addr() net.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ln == nil {
		return nil
	}
	return h.ln.Addr()
}

// WSAddr is the bound WebSocket address (nil before Start or without one).
func (h *Hub) WSAddr() net.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.wsl == nil {
		return nil
	}
	return h.wsl.Addr()
}

// Close stops listening, drops every connection and waits for the hub's
// goroutines. It is safe to call more than once.
func (h *Hub) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	srv, ln := h.srv, h.ln
	h.mu.Unlock()

	h.cancel()
	broker.Quiesce(ln, h.wsl)
	if srv != nil {
		_ = srv.Close() // closes the listeners (done already) and every client
	}
	h.wg.Wait()
	return h.quota.save()
}

// DropAll drops every device connection at once, as a network failure
// would (no DISCONNECT is sent). Devices may reconnect immediately.
func (h *Hub) DropAll() {
	h.mu.Lock()
	var cls []*mqtt.Client
	for cl := range h.conns {
		cls = append(cls, cl)
	}
	h.mu.Unlock()
	for _, cl := range cls {
		cl.Stop(errDropped)
	}
}

var errDropped = errors.New("connection dropped by azsim (fault injection or admin action)")

// RegisterDevice creates the device identity or updates it, keeping its
// twin, C2D queue and certificate record. It implements identity.Registrar.
// A device updated to disabled loses its connection.
func (h *Hub) RegisterDevice(ctx context.Context, d identity.Device) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("hub register device: %w", err)
	}
	spec := deviceSpec{Auth: d.Auth, PrimaryKey: d.PrimaryKey, Thumbprints: d.Thumbprints, Enabled: &d.Enabled, CertificateCN: d.CertificateCN}
	h.mu.Lock()
	if _, exists := h.devices[d.ID]; exists {
		// Like Azure: provisioning again does not re-enable a device an
		// operator disabled at the hub.
		spec.Enabled = nil
	}
	h.mu.Unlock()
	if _, _, err := h.putDevice(d.ID, spec); err != nil {
		return fmt.Errorf("hub register device: %w", err)
	}
	if h.cfg.CredentialSyncLag > 0 {
		h.mu.Lock()
		if dev, ok := h.devices[d.ID]; ok {
			dev.syncUntil = h.now().Add(h.cfg.CredentialSyncLag)
		}
		h.mu.Unlock()
	}
	return nil
}

// AdminHandler serves the hub's admin API (JSON) on paths under /hub/.
// Mount it without stripping the prefix: mux.Handle("/hub/", h.AdminHandler()).
func (h *Hub) AdminHandler() http.Handler {
	return h.adminMux()
}

// goLocked starts fn as a hub goroutine unless the hub is closing. h.mu
// must be held so that Close cannot slip between the check and wg.Add.
func (h *Hub) goLocked(fn func()) {
	if h.closed {
		return
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		fn()
	}()
}
