// Package dps emulates the Azure IoT Hub Device Provisioning Service over
// MQTT (Learn: "Communicate with DPS using the MQTT protocol"; sources in
// docs/azure-fidelity.md): X.509 and symmetric-key enrollment groups,
// 202 + retry-after then polling, and certificate issuance from a CSR.
package dps

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/identity"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// Config configures a DPS instance. TLS, Registrar and Issuer are required.
type Config struct {
	Addr    string // listen address; ":0" picks a port
	WSAddr  string // if set, also serve MQTT over WebSockets there
	IDScope string // default "0ne00AZSIM0"
	// TLS carries the server certificate; DPS requests a client certificate
	// and speaks TLS 1.2 only unless MaxVersion is set.
	TLS *tls.Config
	// Registrar is the hub devices are assigned to.
	Registrar identity.Registrar
	// Allocate, if set, picks the hub for a registration (an allocation
	// policy, or an operator moving a device); nil results mean Registrar.
	Allocate func(registrationID string) identity.Registrar
	// Issuer signs operational certificates from CSRs.
	Issuer identity.Issuer
	// CertLifetime of issued certificates; default 30 days.
	CertLifetime time.Duration
	// RetryAfter is the retry-after DPS sends with 202; default 3 s, as Azure.
	RetryAfter int
	// AcceptP256 also accepts P-256 CSRs (the SDK samples use them); by
	// default only P-384 is accepted, as documented.
	AcceptP256 bool
	// StateDir keeps dps.json (enrollments, registrations). Empty: memory only.
	StateDir string
	Faults   *faults.Injector
	Now      func() time.Time
	// PollLimit is the number of operation-status polls a registration may
	// send per 10 s before DPS answers 429 with retry-after, as Azure DPS
	// does at 5. Zero: no limit.
	PollLimit int
	// HTTPTimeout bounds reading one REST request (headers and body),
	// twice over reading and answering it, and three times over an idle
	// keep-alive connection; default 30 s.
	HTTPTimeout time.Duration
}

// Enrollment is an enrollment group or, with Individual, an individual
// enrollment whose ID is the device's registration id. An individual
// enrollment takes precedence over the groups for its registration id, as
// in Azure. Other attestation kinds (a TPM's endorsement key) plug in as
// further Kind values handled by authenticate.
type Enrollment struct {
	ID         string `json:"id"`
	Kind       string `json:"kind"` // "x509" or "symmetricKey"
	Enabled    bool   `json:"enabled"`
	Individual bool   `json:"individual,omitempty"`
	// DeviceID (individual enrollments) is the hub device id to create;
	// empty: the registration id. Issued certificates keep the
	// registration id as CN.
	DeviceID string `json:"deviceId,omitempty"`
	// CA is the PEM certificate the group trusts (x509): the chain a device
	// presents must reach it.
	CA string `json:"ca,omitempty"`
	// PrimaryKey is the base64 group key (symmetricKey); for an individual
	// enrollment the device's own key.
	PrimaryKey string `json:"primaryKey,omitempty"`

	ca *x509.Certificate
}

// Registration is a device DPS has assigned.
type Registration struct {
	RegistrationID string    `json:"registrationId"`
	DeviceID       string    `json:"deviceId"`
	EnrollmentID   string    `json:"enrollmentGroupId"`
	AssignedHub    string    `json:"assignedHub"`
	Created        time.Time `json:"createdDateTimeUtc"`
	Updated        time.Time `json:"lastUpdatedDateTimeUtc"`
	Count          int       `json:"registrations"`
	CertSerial     string    `json:"certificateSerial,omitempty"`
	CertNotAfter   time.Time `json:"certificateNotAfter,omitzero"`
}

// Enrollment kinds.
const (
	KindX509         = "x509"
	KindSymmetricKey = "symmetricKey"
)

// MinCertAPIVersion is the first api-version that issues certificates.
const MinCertAPIVersion = "2025-07-01-preview"

// DPS is one emulated provisioning service.
type DPS struct {
	cfg Config
	now func() time.Time

	srv *mqtt.Server
	ln  *broker.Listener
	wsl *broker.WebSocketListener

	mu      sync.Mutex
	enroll  map[string]*Enrollment
	regs    map[string]*Registration // by lower-case registration id
	conns   map[*mqtt.Client]*session
	ops     map[string]*operation
	opsMax  int // pruneOps keeps at most this many; default maxOps
	started bool
	saveMu  sync.Mutex // one save at a time, so the newest state is the one on disk
	tpm     *tpmState  // TPM enrollments and the REST endpoint (https.go)

	polls *broker.Window // per registration id
}

// session is what CONNECT established for one client.
type session struct {
	regID      string
	apiVersion string
	chain      []*x509.Certificate
	password   string
}

type operation struct {
	mu      sync.Mutex // serializes the assignment between polls; guards result, status
	id      string
	regID   string
	created time.Time
	readyAt time.Time
	result  []byte // final 200 body once assigned
	status  int
	csr     *x509.CertificateRequest
	group   *Enrollment
	sym     bool
	// tpm, for a TPM attestation's operation, is the challenge the device
	// answered: its polls must be signed with that key, and the outcome
	// names that challenge, whatever challenges were handed out since.
	tpm *tpmChallengeKey
}

// New validates cfg and loads the persisted state.
func New(cfg Config) (*DPS, error) {
	if cfg.TLS == nil || cfg.Registrar == nil || cfg.Issuer == nil {
		return nil, errors.New("dps: TLS, Registrar and Issuer are required")
	}
	if cfg.IDScope == "" {
		cfg.IDScope = "0ne00AZSIM0"
	}
	if cfg.CertLifetime == 0 {
		cfg.CertLifetime = 30 * 24 * time.Hour
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = 3
	}
	if cfg.Faults == nil {
		cfg.Faults = faults.New()
	}
	d := &DPS{cfg: cfg, now: cfg.Now, enroll: map[string]*Enrollment{}, regs: map[string]*Registration{},
		conns: map[*mqtt.Client]*session{}, ops: map[string]*operation{}}
	if d.now == nil {
		d.now = time.Now
	}
	d.polls = &broker.Window{N: cfg.PollLimit, Per: 10 * time.Second}
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("dps: %w", err)
		}
	}
	if err := d.load(); err != nil {
		return nil, err
	}
	var err error
	if d.tpm, err = newTPMState(cfg.StateDir); err != nil {
		return nil, err
	}
	return d, nil
}

// IDScope is the service's id scope.
func (d *DPS) IDScope() string { return d.cfg.IDScope }

// Start listens and serves in the background.
func (d *DPS) Start() error {
	nl, err := net.Listen("tcp", d.cfg.Addr)
	if err != nil {
		return fmt.Errorf("dps start: listen on %s: %w (is the port in use? pick another with --dps-addr)", d.cfg.Addr, err)
	}
	tc := d.cfg.TLS.Clone()
	tc.ClientAuth = tls.RequestClientCert
	tc.VerifyPeerCertificate = d.verifyInHandshake
	tc.MinVersion = max(tc.MinVersion, tls.VersionTLS12)
	if tc.MaxVersion == 0 {
		// Azure DPS speaks TLS 1.2 only: clients must get TLS 1.2 client
		// authentication right (signature schemes chosen by the server).
		tc.MaxVersion = tls.VersionTLS12
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumQos = 1
	caps.MaximumPacketSize = 96 * 1024 // DPS's message limit
	srv := mqtt.New(&mqtt.Options{Capabilities: caps, Logger: slog.New(slog.DiscardHandler), SysTopicResendInterval: 3600})
	if err := srv.AddHook(&hook{d: d}, nil); err != nil {
		nl.Close()
		return err
	}
	ln := broker.New("dps", nl, tc, 30*time.Second)
	if err := srv.AddListener(ln); err != nil {
		nl.Close()
		return err
	}
	var wsl *broker.WebSocketListener
	if d.cfg.WSAddr != "" {
		if wsl, err = broker.ListenWebSocket(srv, "dps-ws", d.cfg.WSAddr, tc, 30*time.Second); err != nil {
			nl.Close()
			return fmt.Errorf("dps start: %w", err)
		}
	}
	if err := srv.Serve(); err != nil {
		nl.Close()
		return err
	}
	d.mu.Lock()
	d.srv, d.ln, d.wsl, d.started = srv, ln, wsl, true
	d.mu.Unlock()
	return nil
}

// Addr is the bound address.
func (d *DPS) Addr() net.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ln == nil {
		return nil
	}
	return d.ln.Addr()
}

// WSAddr is the bound WebSocket address (nil without one).
func (d *DPS) WSAddr() net.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.wsl == nil {
		return nil
	}
	return d.wsl.Addr()
}

// Close stops the service.
func (d *DPS) Close() error {
	d.mu.Lock()
	srv, ln, wsl := d.srv, d.ln, d.wsl
	d.srv, d.ln, d.wsl = nil, nil, nil
	d.mu.Unlock()
	herr := d.closeHTTPS()
	if srv == nil {
		return herr
	}
	broker.Quiesce(ln, wsl)
	err := srv.Close()
	return errors.Join(err, herr)
}

// DropAll closes every client connection (fault).
func (d *DPS) DropAll() {
	d.mu.Lock()
	var cls []*mqtt.Client
	for cl := range d.conns {
		cls = append(cls, cl)
	}
	d.mu.Unlock()
	for _, cl := range cls {
		cl.Stop(errors.New("dropped by fault injection"))
	}
}

// PutEnrollment creates or replaces an enrollment group.
func (d *DPS) PutEnrollment(e Enrollment) error {
	if e.ID == "" {
		return errors.New("enrollment group id is empty")
	}
	if e.Individual {
		// An individual enrollment's id is the device's registration id.
		if err := checkRegistrationID(e.ID); err != nil {
			return fmt.Errorf("individual enrollment: %w", err)
		}
	}
	switch e.Kind {
	case KindX509:
		blk, _ := pemDecode([]byte(e.CA))
		if blk == nil {
			return fmt.Errorf("enrollment %s: ca must be a PEM certificate", e.ID)
		}
		c, err := x509.ParseCertificate(blk)
		if err != nil || !c.IsCA {
			return fmt.Errorf("enrollment %s: ca is not a CA certificate", e.ID)
		}
		e.ca = c
	case KindSymmetricKey:
		if k, err := base64.StdEncoding.DecodeString(e.PrimaryKey); err != nil || len(k) < 16 {
			return fmt.Errorf("enrollment %s: primaryKey must be base64 of at least 16 bytes", e.ID)
		}
	default:
		return fmt.Errorf("enrollment %s: kind %q: use %q or %q", e.ID, e.Kind, KindX509, KindSymmetricKey)
	}
	d.mu.Lock()
	d.enroll[e.ID] = &e
	d.mu.Unlock()
	return d.save()
}

// SetEnabled enables or disables an enrollment group.
func (d *DPS) SetEnabled(id string, on bool) error {
	d.mu.Lock()
	e, ok := d.enroll[id]
	if ok {
		e.Enabled = on
	}
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("no enrollment group %q", id)
	}
	return d.save()
}

// Enrollments lists the enrollment groups.
func (d *DPS) Enrollments() []Enrollment {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Enrollment
	for _, e := range d.enroll {
		out = append(out, *e)
	}
	return out
}

// Registrations lists the assigned devices.
func (d *DPS) Registrations() []Registration {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Registration
	for _, r := range d.regs {
		out = append(out, *r)
	}
	return out
}

// DeriveKey is the device key of regID in a symmetric-key group:
// base64(HMAC-SHA256(groupKey, registrationId)).
func DeriveKey(groupKey, regID string) (string, error) {
	k, err := base64.StdEncoding.DecodeString(groupKey)
	if err != nil {
		return "", fmt.Errorf("group key is not base64: %w", err)
	}
	m := hmac.New(sha256.New, k)
	m.Write([]byte(regID))
	return base64.StdEncoding.EncodeToString(m.Sum(nil)), nil
}

// --- MQTT ---

type hook struct {
	mqtt.HookBase
	d *DPS
}

func (k *hook) ID() string { return "azsim-dps" }

func (k *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnDisconnect,
		mqtt.OnPublish, mqtt.OnPublished, mqtt.OnPacketRead}, []byte{b})
}

func (k *hook) refuse(cl *mqtt.Client, code packets.Code, why error) error {
	_ = k.d.srv.SendConnack(cl, code, false, nil)
	return fmt.Errorf("dps connect %q refused: %w", cl.ID, why)
}

// OnConnect checks the CONNECT rules; credentials are judged at register,
// where DPS answers 401 with an error body.
func (k *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	d := k.d
	if pk.ProtocolVersion != 4 {
		return k.refuse(cl, packets.Err3UnsupportedProtocolVersion, errors.New("DPS speaks MQTT 3.1.1"))
	}
	if d.cfg.Faults.Refusing(faults.DPS, d.now()) {
		return k.refuse(cl, packets.Err3ServerUnavailable, errors.New("refusing connections (fault injected)"))
	}
	user := string(pk.Connect.Username)
	path, query, _ := strings.Cut(user, "/api-version=")
	scope, regID, ok := strings.Cut(path, "/registrations/")
	q, _ := url.ParseQuery("api-version=" + query)
	if !ok || regID == "" || q.Get("api-version") == "" {
		return k.refuse(cl, packets.Err3NotAuthorized, fmt.Errorf("username %q is not {idScope}/registrations/{registrationId}/api-version=...", user))
	}
	if !strings.EqualFold(scope, d.cfg.IDScope) {
		return k.refuse(cl, packets.Err3NotAuthorized, fmt.Errorf("unknown id scope %q", scope))
	}
	if !strings.EqualFold(regID, pk.Connect.ClientIdentifier) {
		return k.refuse(cl, packets.Err3ClientIdentifierNotValid, fmt.Errorf("client id %q differs from the registration id %q", pk.Connect.ClientIdentifier, regID))
	}
	s := &session{regID: regID, apiVersion: q.Get("api-version"), password: string(pk.Connect.Password)}
	s.chain = broker.PeerCertificates(cl.Net.Conn)
	d.mu.Lock()
	d.conns[cl] = s
	d.mu.Unlock()
	return nil
}

func (k *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	k.d.mu.Lock()
	defer k.d.mu.Unlock()
	_, ok := k.d.conns[cl]
	return ok
}

func (k *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	k.d.mu.Lock()
	delete(k.d.conns, cl)
	k.d.mu.Unlock()
}

const resFilter = "$dps/registrations/res/#"

// OnACLCheck: clients may subscribe only to the response filter.
func (k *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	return write || topic == resFilter
}

// OnPacketRead closes connections that publish QoS 2 or to unknown topics.
func (k *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	if pk.FixedHeader.Qos > 1 {
		return pk, fmt.Errorf("QoS 2 PUBLISH: %w", packets.ErrRejectPacket)
	}
	if !strings.HasPrefix(pk.TopicName, registerPrefix) && !strings.HasPrefix(pk.TopicName, pollPrefix) {
		return pk, fmt.Errorf("publish to %q: %w", pk.TopicName, packets.ErrRejectPacket)
	}
	return pk, nil
}

// OnPublish keeps the broker from routing anything.
func (k *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	return pk, packets.CodeSuccessIgnore
}

const (
	registerPrefix = "$dps/registrations/PUT/iotdps-register/?"
	pollPrefix     = "$dps/registrations/GET/iotdps-get-operationstatus/?"
)

// OnPublished answers register and poll requests after the PUBACK.
func (k *hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	d := k.d
	d.mu.Lock()
	s := d.conns[cl]
	d.mu.Unlock()
	if s == nil {
		return
	}
	var q url.Values
	var register bool
	switch {
	case strings.HasPrefix(pk.TopicName, registerPrefix):
		q, _ = url.ParseQuery(pk.TopicName[len(registerPrefix):])
		register = true
	case strings.HasPrefix(pk.TopicName, pollPrefix):
		q, _ = url.ParseQuery(pk.TopicName[len(pollPrefix):])
	default:
		return
	}
	rid := q.Get("$rid")
	if rid == "" {
		return // Azure does not answer a request without $rid
	}
	if a, ok := d.cfg.Faults.Take(faults.DPS); ok {
		d.answer(cl, rid, a.Status, a.RetryAfter, errorBody(a.Status*1000+1, "injected fault"))
		return
	}
	if register {
		d.register(cl, s, rid, pk.Payload)
	} else {
		d.poll(cl, s, rid, q.Get("operationId"))
	}
}

func (d *DPS) answer(cl *mqtt.Client, rid string, status, retryAfter int, body []byte) {
	topic := "$dps/registrations/res/" + strconv.Itoa(status) + "/?$rid=" + url.QueryEscape(rid)
	if retryAfter > 0 {
		topic += "&retry-after=" + strconv.Itoa(retryAfter)
	}
	_, _ = broker.Send(cl, topic, body, 1)
}

func errorBody(code int, msg string) []byte {
	b, _ := json.Marshal(map[string]any{"errorCode": code, "trackingId": newID(), "message": msg,
		"timestampUtc": time.Now().UTC().Format(time.RFC3339Nano)})
	return b
}

// checkRegistrationID applies DPS's registration id rules (the DPS REST
// spec's DeviceRegistration model; Learn "X.509 certificate attestation"): 1 to 128 characters of letters, digits and "-._:", the last a
// letter, a digit or "-". The id becomes a hub device id, a certificate CN
// and part of MQTT topics, so nothing else may pass.
func checkRegistrationID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("registration id of %d characters: it must have 1 to 128", len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && !strings.ContainsRune("-._:", rune(c)) {
			return fmt.Errorf("registration id %q: character %q at %d is not allowed (letters, digits, '-', '.', '_', ':')", id, c, i)
		}
		if i == len(id)-1 && !alnum && c != '-' {
			return fmt.Errorf("registration id %q must end with a letter, a digit or '-'", id)
		}
	}
	return nil
}

// checkAPIVersion accepts api-versions shaped like DPS's (2019-03-31,
// 2025-07-01-preview): a date, optionally "-preview". Which dates the live
// service accepts is not checked; the shape keeps garbage from comparing
// as a recent version.
func checkAPIVersion(v string) error {
	if v == "" {
		return errors.New("api-version is required")
	}
	date := strings.TrimSuffix(v, "-preview")
	if _, err := time.Parse(time.DateOnly, date); err != nil || len(date) != len(time.DateOnly) {
		return fmt.Errorf("api-version %q is not a DPS api-version such as %s", v, MinCertAPIVersion)
	}
	return nil
}

// register handles $dps/registrations/PUT/iotdps-register.
func (d *DPS) register(cl *mqtt.Client, s *session, rid string, payload []byte) {
	reply := func(status, retryAfter int, body []byte) { d.answer(cl, rid, status, retryAfter, body) }
	if err := checkAPIVersion(s.apiVersion); err != nil {
		reply(400, 0, errorBody(400001, err.Error()))
		return
	}
	if err := checkRegistrationID(s.regID); err != nil {
		reply(400, 0, errorBody(400004, err.Error()))
		return
	}
	body, ok := decodeRegister(payload, s.regID, "username", reply)
	if !ok {
		return
	}
	group, sym, err := d.authenticate(s)
	if err != nil {
		reply(401, 0, errorBody(401002, err.Error()))
		return
	}
	d.startOperation(s, group, sym, nil, body.CSR, reply)
}

// poll handles iotdps-get-operationstatus.
func (d *DPS) poll(cl *mqtt.Client, s *session, rid, opID string) {
	reply := func(status, retryAfter int, body []byte) { d.answer(cl, rid, status, retryAfter, body) }
	op, ok := d.lookup(s.regID, opID, reply)
	if !ok {
		return
	}
	d.pollOperation(op, "retry-after", reply, nil)
}

// replyFunc answers one request over either transport: the MQTT response
// topic or the HTTP response.
type replyFunc func(status, retryAfter int, body []byte)

// registerBody is a registration request's body (tpm over HTTPS only).
type registerBody struct {
	RegistrationID string          `json:"registrationId"`
	CSR            *string         `json:"csr"`
	Payload        json.RawMessage `json:"payload"`
	TPM            *struct {
		EndorsementKey string `json:"endorsementKey"`
		StorageRootKey string `json:"storageRootKey"`
	} `json:"tpm"`
}

// decodeRegister decodes a registration body (empty is allowed) and checks
// its registrationId against the one in idFrom (the username or the
// path), answering 400 when either is wrong.
func decodeRegister(raw []byte, regID, idFrom string, reply replyFunc) (*registerBody, bool) {
	var body registerBody
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &body); err != nil {
			reply(400, 0, errorBody(400004, "The request body is not valid JSON: "+err.Error()))
			return nil, false
		}
	}
	if body.RegistrationID != "" && !strings.EqualFold(body.RegistrationID, regID) {
		reply(400, 0, errorBody(400004, "registrationId in the body differs from the one in the "+idFrom))
		return nil, false
	}
	return &body, true
}

// startOperation records an authenticated registration's operation and
// answers 202 assigning: disabled at once when the enrollment is, with its
// CSR checked (400 if bad) when the api-version carries one. tpm marks a
// TPM attestation's operation, whose polls need the TPM's SAS token.
func (d *DPS) startOperation(s *session, group *Enrollment, sym bool, tpm *tpmChallengeKey, csrB64 *string, reply replyFunc) {
	now := d.now()
	op := &operation{id: "4." + newID(), regID: s.regID, created: now, readyAt: now.Add(d.cfg.Faults.AssignDelay()), group: group, sym: sym, tpm: tpm}
	if !group.Enabled {
		op.status, op.result = 200, mustJSON(map[string]any{"operationId": op.id, "status": "disabled",
			"registrationState": map[string]any{"registrationId": s.regID, "status": "disabled"}})
	} else if csrB64 != nil && s.apiVersion >= MinCertAPIVersion {
		csr, err := d.checkCSR(*csrB64, s.regID)
		if err != nil {
			reply(400, 0, errorBody(400004, err.Error()))
			return
		}
		op.csr = csr
	}
	d.mu.Lock()
	d.ops[op.id] = op
	d.pruneOps(now)
	d.mu.Unlock()
	reply(202, d.cfg.RetryAfter, mustJSON(map[string]any{"operationId": op.id, "status": "assigning"}))
}

// Operations are kept for polling for opTTL; past maxOps of them the
// oldest go, so a client registering in a loop cannot grow DPS's memory
// without bound. A pruned operation's poll gets 404, like an unknown one.
const (
	opTTL  = time.Hour
	maxOps = 10000
)

// pruneOps drops operations older than opTTL once there are more than
// opsMax, then the oldest until half of opsMax remain. Called with d.mu
// held.
func (d *DPS) pruneOps(now time.Time) {
	limit := d.opsMax
	if limit <= 0 {
		limit = maxOps
	}
	if len(d.ops) <= limit {
		return
	}
	for id, op := range d.ops {
		if now.Sub(op.created) > opTTL {
			delete(d.ops, id)
		}
	}
	if len(d.ops) > limit {
		all := make([]*operation, 0, len(d.ops))
		for _, op := range d.ops {
			all = append(all, op)
		}
		slices.SortFunc(all, func(a, b *operation) int { return a.created.Compare(b.created) })
		for _, op := range all[:len(all)-limit/2] {
			delete(d.ops, op.id)
		}
	}
}

// lookup finds regID's operation opID, answering 404 when there is none.
func (d *DPS) lookup(regID, opID string, reply replyFunc) (*operation, bool) {
	d.mu.Lock()
	op, ok := d.ops[opID]
	d.mu.Unlock()
	if !ok || !strings.EqualFold(op.regID, regID) {
		reply(404, 0, errorBody(404001, "operation "+opID+" not found"))
		return nil, false
	}
	return op, true
}

// pollOperation answers a status poll of op: 429 past the poll limit
// (retryHint names the transport's retry-after), assigning until it is
// ready, then the outcome, assigned on the first poll after readyAt.
// decorate, if set, adjusts a successful outcome when it is made.
func (d *DPS) pollOperation(op *operation, retryHint string, reply replyFunc, decorate func(*operation)) {
	if ok, wait := d.polls.Allow(strings.ToLower(op.regID), d.now()); !ok {
		reply(429, broker.RetryAfterSeconds(wait), errorBody(429001, fmt.Sprintf("more than %d status polls in 10 s; retry after the %s", d.cfg.PollLimit, retryHint)))
		return
	}
	op.mu.Lock()
	defer op.mu.Unlock()
	if op.result == nil && d.now().Before(op.readyAt) {
		reply(202, d.cfg.RetryAfter, mustJSON(map[string]any{"operationId": op.id, "status": "assigning",
			"registrationState": map[string]any{"registrationId": op.regID, "status": "assigning"}}))
		return
	}
	if op.result == nil {
		if err := d.assign(op); err != nil {
			op.status, op.result = 200, mustJSON(map[string]any{"operationId": op.id, "status": "failed",
				"registrationState": map[string]any{"registrationId": op.regID, "status": "failed", "errorCode": 500001, "errorMessage": err.Error()}})
		} else if decorate != nil {
			decorate(op)
		}
	}
	reply(op.status, 0, op.result)
}

// assign registers the device at the hub and issues its certificate.
func (d *DPS) assign(op *operation) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	now := d.now().UTC()
	deviceID := op.regID
	if op.group.Individual && op.group.DeviceID != "" {
		deviceID = op.group.DeviceID
	}
	dev := identity.Device{ID: deviceID, Auth: identity.AuthCA, Enabled: true, CertificateCN: op.regID}
	var chain []string
	var serial string
	var notAfter time.Time
	if op.csr != nil {
		csr, cn := op.csr, op.regID // the CN stays the registration id
		tamper, tampered := d.cfg.Faults.TakeTamper()
		switch tamper {
		case faults.TamperWrongKey:
			k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
			csr = &x509.CertificateRequest{PublicKey: &k.PublicKey, Subject: csr.Subject}
		case faults.TamperWrongCN:
			cn += "-other"
		}
		certs, err := d.cfg.Issuer.Issue(csr, cn, d.cfg.CertLifetime)
		if err != nil {
			return fmt.Errorf("issuing the certificate: %w", err)
		}
		if tampered && tamper == faults.TamperBrokenChain && len(certs) > 2 {
			certs = append(certs[:1], certs[2:]...)
		}
		for _, c := range certs {
			chain = append(chain, base64.StdEncoding.EncodeToString(c.Raw))
		}
		serial, notAfter = certs[0].SerialNumber.Text(16), certs[0].NotAfter
	} else if op.sym {
		key, _ := DeriveKey(op.group.PrimaryKey, op.regID)
		if op.group.Individual {
			key = op.group.PrimaryKey
		}
		dev.Auth, dev.PrimaryKey = identity.AuthSAS, key
	}
	registrar := d.cfg.Registrar
	if d.cfg.Allocate != nil {
		if r := d.cfg.Allocate(op.regID); r != nil {
			registrar = r
		}
	}
	if err := registrar.RegisterDevice(ctx, dev); err != nil {
		return err
	}
	hub := registrar.HostName()
	d.mu.Lock()
	key := strings.ToLower(op.regID)
	r, ok := d.regs[key]
	substatus := "initialAssignment"
	if !ok {
		r = &Registration{RegistrationID: op.regID, Created: now}
		d.regs[key] = r
	} else if r.AssignedHub != hub {
		// Re-provisioned to another hub; azsim does not copy the twin.
		substatus = "deviceDataMigrated"
	} else {
		substatus = "reprovisionedToInitialAssignment"
	}
	r.DeviceID, r.EnrollmentID, r.AssignedHub, r.Updated = deviceID, op.group.ID, hub, now
	r.Count++
	r.CertSerial, r.CertNotAfter = serial, notAfter
	created := r.Created
	d.mu.Unlock()
	if err := d.save(); err != nil {
		return err
	}
	st := map[string]any{"registrationId": op.regID, "createdDateTimeUtc": created.Format(time.RFC3339Nano),
		"assignedHub": hub, "deviceId": deviceID, "status": "assigned", "substatus": substatus,
		"lastUpdatedDateTimeUtc": now.Format(time.RFC3339Nano), "etag": base64.StdEncoding.EncodeToString([]byte(newID()))}
	enr := map[string]any{"enrollmentGroupId": op.group.ID}
	if op.group.Individual {
		enr = map[string]any{}
	}
	if op.sym {
		st["symmetricKey"] = enr
	} else {
		st["x509"] = enr
	}
	if chain != nil {
		st["issuedCertificateChain"] = chain
	}
	op.status, op.result = 200, mustJSON(map[string]any{"operationId": op.id, "status": "assigned", "registrationState": st})
	return nil
}

// authenticate finds the enrollment group for the session's credential.
func (d *DPS) authenticate(s *session) (*Enrollment, bool, error) {
	d.mu.Lock()
	groups := make([]*Enrollment, 0, len(d.enroll))
	for _, e := range d.enroll {
		groups = append(groups, e)
	}
	d.mu.Unlock()
	// An individual enrollment for this registration id comes first.
	slices.SortStableFunc(groups, func(a, b *Enrollment) int {
		ia, ib := a.Individual && strings.EqualFold(a.ID, s.regID), b.Individual && strings.EqualFold(b.ID, s.regID)
		switch {
		case ia && !ib:
			return -1
		case ib && !ia:
			return 1
		}
		return 0
	})
	groups = slices.DeleteFunc(groups, func(e *Enrollment) bool { return e.Individual && !strings.EqualFold(e.ID, s.regID) })
	now := d.now()
	if len(s.chain) > 0 {
		leaf := s.chain[0]
		if !strings.EqualFold(leaf.Subject.CommonName, s.regID) {
			return nil, false, fmt.Errorf("certificate CN %q is not the registration id %q", leaf.Subject.CommonName, s.regID)
		}
		if !clientAuthLeaf(leaf) {
			return nil, false, errors.New("Invalid certificate: the leaf's extended key usage does not include clientAuth")
		}
		inter := x509.NewCertPool()
		for _, c := range s.chain[1:] {
			inter.AddCert(c)
		}
		for _, g := range groups {
			if g.Kind != KindX509 || g.ca == nil {
				continue
			}
			roots := x509.NewCertPool()
			roots.AddCert(g.ca)
			// Like Azure: clientAuth is required of the leaf only, not of
			// the intermediates (crypto/tls's default would demand it of
			// every certificate that carries an EKU list).
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
				return g, false, nil
			}
		}
		return nil, false, errors.New("Invalid certificate: the chain does not reach a CA of any enrollment group (send the leaf and every intermediate)")
	}
	if s.password == "" {
		return nil, false, errors.New("no credential: present a client certificate or a SAS token")
	}
	sr, rawSR, sig, se, err := parseSAS(s.password)
	if err != nil {
		return nil, false, err
	}
	want := strings.ToLower(d.cfg.IDScope + "/registrations/" + s.regID)
	if !strings.EqualFold(sr, want) {
		return nil, false, fmt.Errorf("SAS token resource %q is not %s", sr, want)
	}
	if now.Unix() >= se {
		return nil, false, errors.New("SAS token expired")
	}
	for _, g := range groups {
		if g.Kind != KindSymmetricKey {
			continue
		}
		key, err := DeriveKey(g.PrimaryKey, s.regID)
		if g.Individual {
			key, err = g.PrimaryKey, nil // the device's own key
		}
		if err != nil {
			continue
		}
		if signatureOK(key, rawSR, url.QueryEscape(sr), se, sig) {
			return g, true, nil
		}
	}
	return nil, false, errors.New("The SAS token's signature does not match any enrollment group's derived key")
}

// verifyInHandshake is both endpoints' tls.Config.VerifyPeerCertificate:
// a certificate named by Faults.RejectCertificate is refused with a
// bad_certificate alert, as Azure does when no enrollment trusts it. Every
// other chain is left to the registration, which answers 401.
func (d *DPS) verifyInHandshake(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return nil
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("client certificate does not parse: %w", err)
	}
	if d.cfg.Faults.CertificateRejected(leaf.SerialNumber.Text(16)) {
		return errors.New("client certificate refused (fault injected)")
	}
	return nil
}

// clientAuthLeaf: the leaf allows TLS client authentication (no EKU list
// means any usage).
func clientAuthLeaf(c *x509.Certificate) bool {
	if len(c.ExtKeyUsage) == 0 && len(c.UnknownExtKeyUsage) == 0 {
		return true
	}
	return slices.ContainsFunc(c.ExtKeyUsage, func(u x509.ExtKeyUsage) bool {
		return u == x509.ExtKeyUsageClientAuth || u == x509.ExtKeyUsageAny
	})
}

// parseSAS returns the token's resource decoded (sr) and as it appears in
// the token (rawSR): the signature covers the latter.
func parseSAS(p string) (sr, rawSR, sig string, se int64, err error) {
	rest, ok := strings.CutPrefix(p, "SharedAccessSignature ")
	if !ok {
		return "", "", "", 0, errors.New("password is not a SharedAccessSignature")
	}
	q, err := url.ParseQuery(rest)
	if err != nil {
		return "", "", "", 0, fmt.Errorf("malformed SAS token: %w", err)
	}
	// The C and Node SDKs send skn=registration; Microsoft's Python SDK
	// (azure-iot-device 2.x) sends no skn, and its end-to-end tests register
	// that way against live DPS. Any other policy name is refused.
	if skn, named := q["skn"]; named && (len(skn) != 1 || skn[0] != "registration") {
		return "", "", "", 0, errors.New("SAS token skn must be \"registration\" or absent; a device signs with its own key, not a service policy")
	}
	se, err = strconv.ParseInt(q.Get("se"), 10, 64)
	if err != nil || q.Get("sig") == "" || q.Get("sr") == "" {
		return "", "", "", 0, errors.New("SAS token lacks sr, sig or se")
	}
	for _, kv := range strings.Split(rest, "&") {
		if v, ok := strings.CutPrefix(kv, "sr="); ok {
			rawSR = v
		}
	}
	return q.Get("sr"), rawSR, q.Get("sig"), se, nil
}

// signatureOK checks sig over "{sr}\n{se}". The SDKs differ: the C SDKs
// sign the percent-encoded resource (upper or lower case), the Node SDK the
// plain one as it sends it; the token's own form is tried first.
func signatureOK(deviceKey, rawSR, encodedSR string, se int64, sig string) bool {
	k, _ := base64.StdEncoding.DecodeString(deviceKey)
	got, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		return false
	}
	for _, sr := range []string{rawSR, encodedSR, strings.ReplaceAll(encodedSR, "%2F", "%2f")} {
		m := hmac.New(sha256.New, k)
		fmt.Fprintf(m, "%s\n%d", sr, se)
		if hmac.Equal(m.Sum(nil), got) {
			return true
		}
	}
	return false
}

// checkCSR validates a registration's csr (Learn: "Certificate issuance":
// base64 DER without PEM armour, CN = registration id, EC P-384).
func (d *DPS) checkCSR(b64, regID string) (*x509.CertificateRequest, error) {
	if strings.Contains(b64, "-----BEGIN") {
		return nil, errors.New("csr must be base64 of the DER PKCS#10, without PEM armour")
	}
	der, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("csr is not base64: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("csr is not a PKCS#10 request: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr signature does not verify: %v", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("csr key is %T; only EC keys (P-384) are supported", csr.PublicKey)
	}
	if pub.Curve != elliptic.P384() && !(d.cfg.AcceptP256 && pub.Curve == elliptic.P256()) {
		return nil, fmt.Errorf("csr key is on %s; use P-384", pub.Curve.Params().Name)
	}
	if csr.Subject.CommonName != regID {
		return nil, fmt.Errorf("csr subject CN %q must equal the registration id %q", csr.Subject.CommonName, regID)
	}
	return csr, nil
}

// --- persistence ---

type persisted struct {
	Enrollments   []*Enrollment            `json:"enrollments"`
	Registrations map[string]*Registration `json:"registrations"`
}

func (d *DPS) path() string { return filepath.Join(d.cfg.StateDir, "dps.json") }

func (d *DPS) load() error {
	if d.cfg.StateDir == "" {
		return nil
	}
	b, err := os.ReadFile(d.path())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("dps: %w", err)
	}
	var p persisted
	if err := json.Unmarshal(b, &p); err != nil {
		return fmt.Errorf("dps: %s is damaged: %w; delete it to start over", d.path(), err)
	}
	for _, e := range p.Enrollments {
		if e.Kind == KindX509 {
			if blk, _ := pemDecode([]byte(e.CA)); blk != nil {
				e.ca, _ = x509.ParseCertificate(blk)
			}
			if e.ca == nil {
				return fmt.Errorf("dps: enrollment %s has a bad CA in %s", e.ID, d.path())
			}
		}
		d.enroll[e.ID] = e
	}
	if p.Registrations != nil {
		d.regs = p.Registrations
	}
	return nil
}

func (d *DPS) save() error {
	if d.cfg.StateDir == "" {
		return nil
	}
	d.saveMu.Lock()
	defer d.saveMu.Unlock()
	d.mu.Lock()
	p := persisted{Registrations: d.regs}
	for _, e := range d.enroll {
		p.Enrollments = append(p.Enrollments, e)
	}
	b, err := json.MarshalIndent(&p, "", "  ")
	d.mu.Unlock()
	if err != nil {
		return err
	}
	return atomicfile.Write(d.path(), b, 0o600)
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}
