// Package azsim wires azsim's parts into one emulator: the PKI, DPS, the IoT
// Hub, fault injection and the loopback admin API. Several Servers may run
// in one process (tests); there is no global state.
package azsim

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/hub"
	"github.com/gwagent/gwagent/azsim/identity"
	"github.com/gwagent/gwagent/azsim/pki"
)

// Config configures a Server. Zero values get the documented defaults.
type Config struct {
	StateDir string // required
	DPSAddr  string // default 127.0.0.1:8883 (":0" style addresses are fine)
	// DPSHTTPSAddr is DPS's REST endpoint (TPM attestation and the HTTPS
	// transport); default 127.0.0.1:8443.
	DPSHTTPSAddr string
	HubAddr      string // default 127.0.0.1:8884
	AdminAddr    string // default 127.0.0.1:8480; must be loopback
	// DPSWSAddr and HubWSAddr serve MQTT over WebSockets (Azure's 443);
	// defaults 127.0.0.1:8445 and 127.0.0.1:8444, or an ephemeral port when
	// the MQTT address's is ephemeral; "off" serves none.
	DPSWSAddr string
	HubWSAddr string
	// HubHostName is the hub's name as devices dial it; default
	// "localhost:PORT" ("localhost" on 8883).
	HubHostName string
	IDScope     string // default 0ne00AZSIM0
	// CertLifetime of operational certificates (DPS and the hub's renewal
	// API); default 30 days, down to seconds for renewal tests.
	CertLifetime time.Duration
	// TelemetryLog is a file that gets one JSON line per device-to-cloud
	// message. Empty: none.
	TelemetryLog string
	// ServerNames are extra DNS names or IPs for the TLS server certificate;
	// the admin API also accepts them as Host (besides loopback names).
	ServerNames []string
	// RetryAfter is DPS's retry-after in seconds; default 3.
	RetryAfter int
	// IssueDelay is the hub renewal API's delay between 202 and 200.
	IssueDelay time.Duration
	// AcceptP256 lets DPS accept P-256 CSRs too.
	AcceptP256 bool
	// ServerKey is the key type of the TLS server chains: "rsa" (default,
	// RSA-2048 like Azure's public endpoints) or "ecdsa".
	ServerKey string
	// Gentle makes azsim kinder than Azure, for demos: no CA list in the
	// CertificateRequest, bad client certificates refused with CONNACK 5
	// rather than in the TLS handshake. By default azsim is at least as hard
	// as Azure (docs/azure-fidelity.md).
	Gentle bool
	// NoCertificateManagement plays a hub without the certificate-signing
	// API: it refuses the $iothub/credentials subscription (SUBACK 0x80).
	NoCertificateManagement bool
	// CredentialSyncLag: for this long after a DPS registration the hub
	// refuses the newly issued certificate (CONNACK 5), as Azure's
	// asynchronous credential sync can. The CLI's default is 5 s.
	CredentialSyncLag time.Duration
	// Throttling like the real services; zero values get Azure's figures
	// (DPS: 5 status polls per 10 s per registration; hub: 100 connections
	// and 50 twin operations per second, one S1 unit), negative ones or
	// Gentle turn the limit off.
	DPSPollLimit int
	// DPSHTTPTimeout bounds one request's headers and body on DPS's REST
	// endpoint (three times over, an idle connection); default 30 s.
	DPSHTTPTimeout time.Duration
	HubConnectRate int
	HubTwinRate    int
	// HubTier and HubUnits are the hub's tier (F1, B1, B2, B3, S1, S2, S3)
	// and units (default 1). With a tier, the rates above default to the
	// tier's, and the hub also has the tier's device-to-cloud send
	// throttle with traffic shaping and its daily message quota (4 KB
	// chunks, 0.5 KB on F1; 403002 once used up, reset at 00:00 UTC), as
	// docs/azure-fidelity.md describes. Empty (the library's default): no
	// device-to-cloud throttle and no quota, unless HubD2CRate or
	// HubDailyQuota set one. The CLI's default is S1 × 1.
	HubTier  string
	HubUnits int
	// HubD2CRate (sends per second) and HubDailyQuota (messages per UTC
	// day) override the tier's figures; negative turns them off. Gentle
	// turns both off.
	HubD2CRate    int
	HubDailyQuota int64
	// HubD2CBurst (messages taken at once above the rate; default one
	// second's worth) and HubD2CBacklog (the longest a message is held
	// before the hub closes the connection; default 10 s) shape the
	// device-to-cloud throttle.
	HubD2CBurst   int
	HubD2CBacklog time.Duration
	// Hub2Addr, if set, starts a second IoT Hub there ("127.0.0.1:0" in
	// tests); DPS assigns a device to it after POST /dps/allocate.
	Hub2Addr string
	Now      func() time.Time
}

// Default enrollment groups created on a fresh state directory.
const (
	X509Group         = "factory-x509"
	SymmetricKeyGroup = "factory-symkey"
)

// Server is one running azsim.
type Server struct {
	cfg    Config
	PKI    *pki.PKI
	DPS    *dps.DPS
	Hub    *hub.Hub
	Hub2   *hub.Hub // nil unless Config.Hub2Addr is set
	Faults *faults.Injector

	allocMu sync.Mutex
	alloc   map[string]*hub.Hub // by lower-case registration id

	admin   *http.Server
	adminLn net.Listener
	logFile *os.File
}

// Info is what clients need to use a running azsim.
type Info struct {
	IDScope      string `json:"idScope"`
	DPSAddr      string `json:"dpsAddr"`      // host:port for devices
	DPSHTTPSAddr string `json:"dpsHttpsAddr"` // host:port of the REST endpoint
	HubHostName  string `json:"hubHostName"`  // as devices dial it
	Hub2HostName string `json:"hub2HostName,omitempty"`
	AdminURL     string `json:"adminUrl"`
	// DPSWebSocketPort and HubWebSocketPort are the WebSocket ports (0: none),
	// on the same host names as DPSAddr and HubHostName.
	DPSWebSocketPort int `json:"dpsWebSocketPort,omitempty"`
	HubWebSocketPort int `json:"hubWebSocketPort,omitempty"`
	// Listen is every address azsim really bound, as host:port (":0" in
	// the configuration shows here as the port the kernel picked).
	Listen         Listen `json:"listen"`
	TrustBundle    string `json:"trustBundle"`    // PEM file to trust azsim's servers
	OnboardingRoot string `json:"onboardingRoot"` // PEM file of the company root
	X509Group      string `json:"x509Group"`
	SymmetricGroup string `json:"symmetricKeyGroup"`
}

// Listen is the bound address of each listener ("" for one not running).
type Listen struct {
	DPS          string `json:"dps"`
	DPSHTTPS     string `json:"dpsHttps"`
	DPSWebSocket string `json:"dpsWebSocket,omitempty"`
	Hub          string `json:"hub"`
	HubWebSocket string `json:"hubWebSocket,omitempty"`
	Hub2         string `json:"hub2,omitempty"`
	Admin        string `json:"admin"`
}

// New prepares a Server: PKI, state, default enrollments. Start serves.
func New(cfg Config) (*Server, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("azsim: a state directory is required (--state DIR)")
	}
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&cfg.DPSAddr, "127.0.0.1:8883")
	def(&cfg.DPSHTTPSAddr, "127.0.0.1:8443")
	def(&cfg.HubAddr, "127.0.0.1:8884")
	def(&cfg.AdminAddr, "127.0.0.1:8480")
	wsDefault := func(raw, fixed string) string {
		if h, p, err := net.SplitHostPort(raw); err == nil && p == "0" {
			return net.JoinHostPort(h, "0")
		}
		return fixed
	}
	def(&cfg.DPSWSAddr, wsDefault(cfg.DPSAddr, "127.0.0.1:8445"))
	def(&cfg.HubWSAddr, wsDefault(cfg.HubAddr, "127.0.0.1:8444"))
	wsAddr := func(a string) string {
		if a == "off" {
			return ""
		}
		return a
	}
	if err := loopbackOnly(cfg.AdminAddr); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("azsim: state directory: %w", err)
	}
	p, err := pki.Load(filepath.Join(cfg.StateDir, "pki"), cfg.ServerNames, cfg.Now)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, PKI: p, Faults: faults.New()}
	var tlog io.Writer
	if cfg.TelemetryLog != "" {
		f, err := os.OpenFile(cfg.TelemetryLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("azsim: telemetry log: %w", err)
		}
		s.logFile, tlog = f, f
	}
	limit := func(v, azure int) int { return limitOf(cfg.Gentle, v, azure) }
	// Without a tier: S1's connection and twin rates (as before tiers were
	// emulated), no send throttle, no quota.
	tier := hub.Tier{ConnectRate: 100, TwinRate: 50}
	if cfg.HubTier != "" {
		if tier, err = hub.TierLimits(cfg.HubTier, max(cfg.HubUnits, 1)); err != nil {
			s.Close()
			return nil, fmt.Errorf("azsim: %w", err)
		}
	} else if cfg.HubUnits != 0 {
		s.Close()
		return nil, errors.New("azsim: hub units need a hub tier (--hub-tier S1|S2|S3|F1|B1|B2|B3)")
	}
	serverTLS, err := p.ServerTLS(cfg.ServerKey, !cfg.Gentle)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("azsim: %w", err)
	}
	s.Hub, err = hub.New(hub.Config{Addr: cfg.HubAddr, WSAddr: wsAddr(cfg.HubWSAddr), HostName: cfg.HubHostName, TLS: serverTLS, Issuer: p,
		CertLifetime: cfg.CertLifetime, StateDir: filepath.Join(cfg.StateDir, "hub"), TelemetryLog: tlog,
		Faults: s.Faults, Now: cfg.Now, IssueDelay: cfg.IssueDelay, RejectInHandshake: !cfg.Gentle,
		NoCertificateManagement: cfg.NoCertificateManagement, CredentialSyncLag: cfg.CredentialSyncLag,
		ConnectRate: limit(cfg.HubConnectRate, tier.ConnectRate), TwinRate: limit(cfg.HubTwinRate, tier.TwinRate),
		Tier: tier, D2CRate: limit(cfg.HubD2CRate, tier.D2CRate), D2CBurst: cfg.HubD2CBurst, D2CBacklog: cfg.HubD2CBacklog,
		DailyQuota: limitOf(cfg.Gentle, cfg.HubDailyQuota, tier.DailyQuota), QuotaChunk: tier.ChunkBytes})
	if err != nil {
		s.Close()
		return nil, err
	}
	if err := s.Hub.TrustCA("azsim-onboarding-root", p.OnboardRoot.Cert); err != nil {
		s.Close()
		return nil, err
	}
	if cfg.Hub2Addr != "" {
		hc := s.Hub.Config()
		// The second hub serves MQTT only: no WebSocket listener of its own.
		hc.Addr, hc.WSAddr, hc.HostName, hc.StateDir = cfg.Hub2Addr, "", "", filepath.Join(cfg.StateDir, "hub2")
		if s.Hub2, err = hub.New(hc); err != nil {
			s.Close()
			return nil, err
		}
		if err := s.Hub2.TrustCA("azsim-onboarding-root", p.OnboardRoot.Cert); err != nil {
			s.Close()
			return nil, err
		}
	}
	s.DPS, err = dps.New(dps.Config{Addr: cfg.DPSAddr, WSAddr: wsAddr(cfg.DPSWSAddr), IDScope: cfg.IDScope, TLS: serverTLS, Registrar: s.Hub,
		Allocate: s.allocate,
		Issuer:   p, CertLifetime: cfg.CertLifetime, RetryAfter: cfg.RetryAfter, AcceptP256: cfg.AcceptP256,
		StateDir: filepath.Join(cfg.StateDir, "dps"), Faults: s.Faults, Now: cfg.Now, PollLimit: limit(cfg.DPSPollLimit, 5),
		HTTPTimeout: cfg.DPSHTTPTimeout})
	if err != nil {
		s.Close()
		return nil, err
	}
	if err := s.defaultEnrollments(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// limitOf is a configured limit: Azure's figure for zero, none (0) for a
// negative value or a gentle azsim, else the value itself.
func limitOf[T int | int64](gentle bool, v, azure T) T {
	switch {
	case gentle || v < 0:
		return 0
	case v == 0:
		return azure
	}
	return v
}

func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("azsim: admin address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("azsim: the admin API has no authentication; its address %q must be loopback (127.0.0.1)", addr)
	}
	return nil
}

// hostCheck refuses requests whose Host header is neither a loopback name
// or address nor one of names (Config.ServerNames: names the operator gave
// this azsim, e.g. for a VM that reaches it through a forwarded port). The
// admin API has no authentication and listens on loopback only, but a web
// page the developer opens could still reach it through DNS rebinding (a
// name of the attacker's that resolves to 127.0.0.1): the browser then sends
// the attacker's name as Host, which is refused here.
func hostCheck(names []string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !loopbackHost(r.Host) && !namedHost(r.Host, names) {
			broker.WriteJSON(w, http.StatusForbidden, map[string]string{"error": fmt.Sprintf(
				"the admin API answers only requests addressed to localhost, 127.0.0.1, [::1] or a name given with --server-names (Host %q refused, against DNS rebinding); use http://127.0.0.1:PORT", r.Host)})
			return
		}
		h.ServeHTTP(w, r)
	})
}

// hostOnly strips the port and IPv6 brackets from a Host header.
func hostOnly(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		return h
	}
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		return host[1 : len(host)-1]
	}
	return host
}

func namedHost(host string, names []string) bool {
	host = hostOnly(host)
	return host != "" && slices.ContainsFunc(names, func(n string) bool { return strings.EqualFold(strings.TrimSpace(n), host) })
}

// loopbackHost reports whether a Host header names this machine's loopback:
// localhost or a loopback IP, with or without a port.
func loopbackHost(host string) bool {
	host = hostOnly(host)
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (s *Server) defaultEnrollments() error {
	have := map[string]bool{}
	for _, e := range s.DPS.Enrollments() {
		have[e.ID] = true
	}
	if !have[X509Group] {
		if err := s.DPS.PutEnrollment(dps.Enrollment{ID: X509Group, Kind: dps.KindX509, Enabled: true,
			CA: string(pki.PEM(s.PKI.OnboardRoot.Cert))}); err != nil {
			return err
		}
	}
	if !have[SymmetricKeyGroup] {
		k := make([]byte, 64)
		rand.Read(k)
		if err := s.DPS.PutEnrollment(dps.Enrollment{ID: SymmetricKeyGroup, Kind: dps.KindSymmetricKey, Enabled: true,
			PrimaryKey: base64.StdEncoding.EncodeToString(k)}); err != nil {
			return err
		}
	}
	return nil
}

// allocate is DPS's allocation: the hub an operator moved the device to
// (POST /dps/allocate), else the first hub.
func (s *Server) allocate(regID string) identity.Registrar {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if h := s.alloc[strings.ToLower(regID)]; h != nil {
		return h
	}
	return nil
}

// MoveDevice makes DPS assign regID to the second hub (to2) or the first
// at its next registration, as an operator changing the allocation does.
func (s *Server) MoveDevice(regID string, to2 bool) error {
	h := s.Hub
	if to2 {
		if s.Hub2 == nil {
			return errors.New("azsim: no second hub; start with --hub2-addr")
		}
		h = s.Hub2
	}
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if s.alloc == nil {
		s.alloc = map[string]*hub.Hub{}
	}
	s.alloc[strings.ToLower(regID)] = h
	return nil
}

// Warnings lists state that was damaged and dropped so that azsim could
// start (the hubs' quota and session files); cmd/azsim prints them.
func (s *Server) Warnings() []string {
	w := s.Hub.Warnings()
	if s.Hub2 != nil {
		w = append(w, s.Hub2.Warnings()...)
	}
	return w
}

// Start serves DPS, the hubs and the admin API.
func (s *Server) Start() error {
	if err := s.Hub.Start(); err != nil {
		return err
	}
	if s.Hub2 != nil {
		if err := s.Hub2.Start(); err != nil {
			return err
		}
	}
	if err := s.DPS.Start(); err != nil {
		return err
	}
	if err := s.DPS.StartHTTPS(s.cfg.DPSHTTPSAddr); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.cfg.AdminAddr)
	if err != nil {
		return fmt.Errorf("azsim: admin API: %w (pick another port with --admin-addr)", err)
	}
	s.adminLn = ln
	s.admin = &http.Server{Handler: hostCheck(s.cfg.ServerNames, s.adminMux()), ReadHeaderTimeout: 10 * time.Second}
	go s.admin.Serve(ln)
	return nil
}

// Close stops everything.
func (s *Server) Close() error {
	var errs []error
	if s.admin != nil {
		errs = append(errs, s.admin.Close())
	}
	if s.DPS != nil {
		errs = append(errs, s.DPS.Close())
	}
	if s.Hub != nil {
		errs = append(errs, s.Hub.Close())
	}
	if s.Hub2 != nil {
		errs = append(errs, s.Hub2.Close())
	}
	if s.logFile != nil {
		errs = append(errs, s.logFile.Close())
	}
	return errors.Join(errs...)
}

// Info describes the running server.
func (s *Server) Info() Info {
	inf := Info{IDScope: s.DPS.IDScope(), HubHostName: s.Hub.HostName(), TrustBundle: s.PKI.TrustBundle(),
		OnboardingRoot: filepath.Join(s.PKI.Dir(), pki.OnboardRootFile), X509Group: X509Group, SymmetricGroup: SymmetricKeyGroup}
	if s.Hub2 != nil {
		inf.Hub2HostName = s.Hub2.HostName()
	}
	if a, ok := s.DPS.Addr().(*net.TCPAddr); ok {
		inf.DPSAddr = hub.DialAddr(a)
		inf.Listen.DPS = a.String()
	}
	if a, ok := s.DPS.HTTPSAddr().(*net.TCPAddr); ok {
		inf.DPSHTTPSAddr = hub.DialAddr(a)
		inf.Listen.DPSHTTPS = a.String()
	}
	if a, ok := s.DPS.WSAddr().(*net.TCPAddr); ok {
		inf.DPSWebSocketPort = a.Port
		inf.Listen.DPSWebSocket = a.String()
	}
	if a, ok := s.Hub.Addr().(*net.TCPAddr); ok {
		inf.Listen.Hub = a.String()
	}
	if a, ok := s.Hub.WSAddr().(*net.TCPAddr); ok {
		inf.HubWebSocketPort = a.Port
		inf.Listen.HubWebSocket = a.String()
	}
	if s.Hub2 != nil {
		if a, ok := s.Hub2.Addr().(*net.TCPAddr); ok {
			inf.Listen.Hub2 = a.String()
		}
	}
	if s.adminLn != nil {
		inf.AdminURL = "http://" + s.adminLn.Addr().String()
		inf.Listen.Admin = s.adminLn.Addr().String()
	}
	return inf
}

// FactorySign signs an onboarding CSR (PEM or base64 DER) as the factory CA
// and returns the PEM chain (leaf, factory intermediate).
func (s *Server) FactorySign(csrText []byte) ([]byte, error) {
	der := csrText
	if blk, _ := pem.Decode(csrText); blk != nil {
		der = blk.Bytes
	} else if b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(csrText))); err == nil {
		der = b
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("factory-sign: not a PKCS#10 CSR (PEM or base64 DER): %w", err)
	}
	chain, err := s.PKI.FactorySign(csr, 0)
	if err != nil {
		return nil, err
	}
	return pki.PEM(chain...), nil
}

func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/hub/", s.Hub.AdminHandler())
	mux.Handle("/dps/", s.DPS.AdminHandler())
	if s.Hub2 != nil {
		mux.Handle("/hub2/", http.StripPrefix("/hub2", rewritePrefix("/hub", s.Hub2.AdminHandler())))
	}
	mux.HandleFunc("POST /dps/allocate", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			RegistrationID string `json:"registrationId"`
			Hub            string `json:"hub"` // "hub" or "hub2"
		}
		if !decode(w, r, &f) {
			return
		}
		if f.RegistrationID == "" || (f.Hub != "hub" && f.Hub != "hub2") {
			broker.WriteJSON(w, 400, map[string]string{"error": `need {"registrationId":"...","hub":"hub"|"hub2"}`})
			return
		}
		if err := s.MoveDevice(f.RegistrationID, f.Hub == "hub2"); err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /info", func(w http.ResponseWriter, r *http.Request) { broker.WriteJSON(w, 200, s.Info()) })
	mux.HandleFunc("POST /factory/sign", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		out, err := s.FactorySign(b)
		if err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		w.Header().Set("Content-Type", "application/x-pem-file")
		w.Write(out)
	})
	mux.HandleFunc("POST /faults", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Target     faults.Target `json:"target"`
			Status     int           `json:"status"`
			RetryAfter int           `json:"retryAfter"`
			Count      int           `json:"count"`
		}
		if !decode(w, r, &f) {
			return
		}
		if (f.Target != faults.DPS && f.Target != faults.Hub) || f.Status < 400 {
			broker.WriteJSON(w, 400, map[string]string{"error": `need {"target":"dps"|"hub","status":>=400,"retryAfter":N,"count":N}`})
			return
		}
		s.Faults.Arm(f.Target, max(f.Count, 1), faults.Answer{Status: f.Status, RetryAfter: f.RetryAfter})
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/refuse", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Target  string  `json:"target"`
			Seconds float64 `json:"seconds"`
		}
		if !decode(w, r, &f) {
			return
		}
		until := time.Now().Add(time.Duration(f.Seconds * float64(time.Second)))
		for _, t := range targets(f.Target) {
			s.Faults.RefuseUntil(t, until)
		}
		s.drop(f.Target)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/drop", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Target string `json:"target"`
		}
		if !decode(w, r, &f) {
			return
		}
		s.drop(f.Target)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/assign-delay", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Seconds float64 `json:"seconds"`
		}
		if !decode(w, r, &f) {
			return
		}
		s.Faults.SetAssignDelay(time.Duration(f.Seconds * float64(time.Second)))
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/tamper", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Kind faults.Tamper `json:"kind"`
		}
		if !decode(w, r, &f) {
			return
		}
		switch f.Kind {
		case faults.TamperWrongKey, faults.TamperWrongCN, faults.TamperBrokenChain:
			s.Faults.ArmTamper(f.Kind)
			w.WriteHeader(http.StatusNoContent)
		default:
			broker.WriteJSON(w, 400, map[string]string{"error": `kind must be "wrong-key", "wrong-cn", or "broken-chain"`})
		}
	})
	mux.HandleFunc("POST /faults/reject-certificate", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Serial string `json:"serial"` // hex
		}
		if !decode(w, r, &f) {
			return
		}
		if f.Serial == "" {
			broker.WriteJSON(w, 400, map[string]string{"error": `need {"serial":"<certificate serial, hex>"}`})
			return
		}
		s.Faults.RejectCertificate(f.Serial)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/twin-delay", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Seconds float64 `json:"seconds"`
			Count   int     `json:"count"`
		}
		if !decode(w, r, &f) {
			return
		}
		if f.Seconds <= 0 || f.Seconds > 3600 || f.Count < 0 {
			broker.WriteJSON(w, 400, map[string]string{"error": `need {"seconds": 0 < s <= 3600, "count": n (default 1)}`})
			return
		}
		s.Faults.DelayTwin(time.Duration(f.Seconds*float64(time.Second)), max(f.Count, 1))
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /faults/credentials", func(w http.ResponseWriter, r *http.Request) {
		var f struct {
			Mode faults.CredentialsMode `json:"mode"`
		}
		if !decode(w, r, &f) {
			return
		}
		switch f.Mode {
		case faults.CredentialsNormal, faults.CredentialsSilent, faults.CredentialsDrop, faults.CredentialsLoseAnswer:
			s.Faults.SetCredentialsMode(f.Mode)
			w.WriteHeader(http.StatusNoContent)
		default:
			broker.WriteJSON(w, 400, map[string]string{"error": `mode must be "", "silent", "drop" or "lose-answer"`})
		}
	})
	mux.HandleFunc("DELETE /faults", func(w http.ResponseWriter, r *http.Request) {
		s.Faults.Reset()
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

func targets(t string) []faults.Target {
	switch t {
	case "dps":
		return []faults.Target{faults.DPS}
	case "hub":
		return []faults.Target{faults.Hub}
	}
	return []faults.Target{faults.DPS, faults.Hub}
}

func (s *Server) drop(target string) {
	for _, t := range targets(target) {
		if t == faults.DPS {
			s.DPS.DropAll()
		} else {
			s.Hub.DropAll()
		}
	}
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(v); err != nil {
		broker.WriteJSON(w, 400, map[string]string{"error": "body is not the expected JSON: " + err.Error()})
		return false
	}
	return true
}

// rewritePrefix serves h with prefix put back in front of the path, so the
// second hub's admin API (which routes under /hub/) answers under /hub2/.
func rewritePrefix(prefix string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r2 := r.Clone(r.Context())
		r2.URL.Path = prefix + r.URL.Path
		r2.URL.RawPath = ""
		h.ServeHTTP(w, r2)
	})
}
