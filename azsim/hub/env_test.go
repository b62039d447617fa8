package hub_test

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/hub"
	"github.com/gwagent/gwagent/azsim/identity"
)

// The tests drive the hub the way a device does: a plain paho client over
// real TLS, with certificates from a small PKI made here (the real azsim PKI
// lives in another package; testIssuer implements identity.Issuer for it).

const apiVersion = "2025-08-01-preview"

// testCA is a CA certificate and its key.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// newCA makes a CA signed by parent (self-signed when parent is nil).
func newCA(t testing.TB, cn string, parent *testCA) *testCA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, key.Public(), signerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: c, key: key}
}

type leafOpts struct {
	notBefore, notAfter time.Time
	dnsNames            []string
	ips                 []net.IP
	server              bool
}

// sign issues a leaf for pub with subject CN.
func (ca *testCA) sign(t testing.TB, pub crypto.PublicKey, cn string, o leafOpts) *x509.Certificate {
	t.Helper()
	if o.notBefore.IsZero() {
		o.notBefore = time.Now().Add(-time.Minute)
	}
	if o.notAfter.IsZero() {
		o.notAfter = time.Now().Add(time.Hour)
	}
	eku := x509.ExtKeyUsageClientAuth
	if o.server {
		eku = x509.ExtKeyUsageServerAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    o.notBefore,
		NotAfter:     o.notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{eku},
		DNSNames:     o.dnsNames,
		IPAddresses:  o.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// testIssuer is an ADR-style root -> issuing CA implementing identity.Issuer.
type testIssuer struct {
	root, issuing *testCA
	mu            sync.Mutex
	issued        int
}

func newTestIssuer(t testing.TB) *testIssuer {
	root := newCA(t, "Test ADR Root", nil)
	return &testIssuer{root: root, issuing: newCA(t, "Test ADR Issuing CA", root)}
}

func (p *testIssuer) Issue(csr *x509.CertificateRequest, cn string, lifetime time.Duration) ([]*x509.Certificate, error) {
	p.mu.Lock()
	p.issued++
	p.mu.Unlock()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: n,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.issuing.cert, csr.PublicKey, p.issuing.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf, p.issuing.cert, p.root.cert}, nil
}

func (p *testIssuer) IssuingCAs() []*x509.Certificate {
	return []*x509.Certificate{p.issuing.cert, p.root.cert}
}

var _ identity.Issuer = (*testIssuer)(nil)

// env is one running hub with everything a test needs to talk to it.
type env struct {
	t        *testing.T
	hub      *hub.Hub
	cfg      hub.Config
	issuer   *testIssuer
	serverCA *testCA
	roots    *x509.CertPool
	logPath  string
	logFile  *os.File
	admin    *httptest.Server
	faults   *faults.Injector
	addr     string
	wsAddr   string // "" unless cfg.WSAddr is set
}

type envOpt func(*hub.Config)

func newEnv(t *testing.T, opts ...envOpt) *env {
	t.Helper()
	e := &env{t: t, issuer: newTestIssuer(t), serverCA: newCA(t, "Test Server CA", nil), faults: faults.New()}
	e.roots = x509.NewCertPool()
	e.roots.AddCert(e.serverCA.cert)
	skey := newKey(t)
	scert := e.serverCA.sign(t, skey.Public(), "localhost", leafOpts{server: true, dnsNames: []string{"localhost"}, ips: []net.IP{net.ParseIP("127.0.0.1")}})
	dir := t.TempDir()
	e.logPath = filepath.Join(dir, "telemetry.jsonl")
	f, err := os.OpenFile(e.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	e.logFile = f
	t.Cleanup(func() { f.Close() })
	e.cfg = hub.Config{
		Addr:         "127.0.0.1:0",
		TLS:          &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{scert.Raw}, PrivateKey: skey}}},
		Issuer:       e.issuer,
		CertLifetime: time.Hour,
		StateDir:     filepath.Join(dir, "state"),
		TelemetryLog: f,
		Faults:       e.faults,
		IssueDelay:   50 * time.Millisecond,
	}
	for _, o := range opts {
		o(&e.cfg)
	}
	e.start()
	return e
}

// start (re)creates the hub from e.cfg and the admin server in front of it.
func (e *env) start() {
	t := e.t
	t.Helper()
	h, err := hub.New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	e.hub = h
	e.addr = h.Addr().String()
	if a := h.WSAddr(); a != nil {
		e.wsAddr = a.String()
	}
	mux := http.NewServeMux()
	mux.Handle("/hub/", h.AdminHandler())
	e.admin = httptest.NewServer(mux)
	admin := e.admin
	t.Cleanup(func() {
		admin.Close()
		h.Close()
	})
}

// restart stops the hub as azsim stopping would and starts a new one on
// the same state directory and ports.
func (e *env) restart() {
	e.t.Helper()
	e.admin.Close()
	if err := e.hub.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.cfg.Addr = e.addr
	if e.wsAddr != "" {
		e.cfg.WSAddr = e.wsAddr
	}
	e.start()
}

// api calls the admin API and decodes the JSON answer into out (if not nil).
func (e *env) api(method, path string, body []byte, out any) int {
	e.t.Helper()
	req, err := http.NewRequest(method, e.admin.URL+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			e.t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, b, err)
		}
	}
	if resp.StatusCode >= 400 {
		var eb struct{ Error string }
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			e.t.Errorf("%s %s: %d without an {\"error\"} body: %s", method, path, resp.StatusCode, b)
		}
	}
	return resp.StatusCode
}

func (e *env) putDevice(id string, spec map[string]any) {
	e.t.Helper()
	b, _ := json.Marshal(spec)
	if st := e.api("PUT", "/hub/devices/"+id, b, nil); st != http.StatusCreated && st != http.StatusOK {
		e.t.Fatalf("PUT device %s: status %d", id, st)
	}
}

// device is a test device's credentials.
type device struct {
	id    string
	key   crypto.Signer
	chain []*x509.Certificate // what it presents, leaf first
	sas   string              // SAS password, for symmetric-key devices
}

func (d *device) tlsCert() *tls.Certificate {
	if len(d.chain) == 0 {
		return nil
	}
	c := tls.Certificate{PrivateKey: d.key, Leaf: d.chain[0]}
	for _, x := range d.chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return &c
}

func makeCSR(t testing.TB, key crypto.Signer, cn string) *x509.CertificateRequest {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

// issuedDevice registers a CA-authenticated device whose certificate comes
// from the test issuer (as DPS would hand it out); it presents leaf +
// issuing CA.
func (e *env) issuedDevice(id string) *device {
	e.t.Helper()
	key := newKey(e.t)
	chain, err := e.issuer.Issue(makeCSR(e.t, key, id), id, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	e.putDevice(id, map[string]any{"auth": "certificateAuthority"})
	return &device{id: id, key: key, chain: chain[:2]}
}

// sasToken builds a hub SAS token independently of the hub's code.
func sasToken(host, id, key string, expiry time.Time) string {
	k, _ := base64.StdEncoding.DecodeString(key)
	sr := url.QueryEscape(host + "/devices/" + id)
	se := strconv.FormatInt(expiry.Unix(), 10)
	m := hmac.New(sha256.New, k)
	m.Write([]byte(sr + "\n" + se))
	sig := base64.StdEncoding.EncodeToString(m.Sum(nil))
	return "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(sig) + "&se=" + se
}

func newSymKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

// client is a connected paho client with its received messages.
type client struct {
	paho.Client
	msgs chan paho.Message
	lost chan error
	// sessionPresent is the CONNACK's session present flag.
	sessionPresent bool
}

type dialOpts struct {
	username   string // default {host}/{id}/?api-version=...
	clientID   string // default the device id
	persistent bool   // CleanSession=0
	cert       *tls.Certificate
	noCert     bool
	password   string
	will       string // Will payload on the device's telemetry topic
	ws         bool   // MQTT over WebSockets (the env needs cfg.WSAddr)
	manualAck  bool   // PUBACK only when the test calls Ack
}

// dial connects d and returns the client, the CONNACK return code and the
// connect error.
func (e *env) dial(d *device, o dialOpts) (*client, byte, error) {
	e.t.Helper()
	if o.clientID == "" {
		o.clientID = d.id
	}
	if o.username == "" {
		o.username = e.hub.HostName() + "/" + d.id + "/?api-version=" + apiVersion + "&DeviceClientType=azsim-test"
	}
	if o.password == "" {
		o.password = d.sas
	}
	tc := &tls.Config{RootCAs: e.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	cert := o.cert
	if cert == nil && !o.noCert {
		cert = d.tlsCert()
	}
	if cert != nil {
		// Present the chain whatever CA list the hub names.
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	c := &client{msgs: make(chan paho.Message, 200), lost: make(chan error, 1)}
	broker := "ssl://" + e.addr
	if o.ws {
		broker = "wss://" + e.wsAddr + "/$iothub/websocket"
	}
	opts := paho.NewClientOptions().
		AddBroker(broker).
		SetClientID(o.clientID).
		SetUsername(o.username).
		SetPassword(o.password).
		SetTLSConfig(tc).
		SetProtocolVersion(4).
		SetCleanSession(!o.persistent).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second).
		SetKeepAlive(60 * time.Second).
		SetOrderMatters(true). // the handler only queues, in arrival order
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.msgs <- m }).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case c.lost <- err:
			default:
			}
		})
	if o.manualAck {
		opts.SetAutoAckDisabled(true)
	}
	if o.will != "" {
		opts.SetWill("devices/"+d.id+"/messages/events/", o.will, 1, false)
	}
	c.Client = paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		e.t.Fatalf("connect %s: timed out", d.id)
	}
	code := tok.(*paho.ConnectToken).ReturnCode()
	if err := tok.Error(); err != nil {
		return nil, code, err
	}
	c.sessionPresent = tok.(*paho.ConnectToken).SessionPresent()
	e.t.Cleanup(func() { c.Disconnect(0) })
	return c, code, nil
}

// mustDial connects or fails the test.
func (e *env) mustDial(d *device, o dialOpts) *client {
	e.t.Helper()
	c, code, err := e.dial(d, o)
	if err != nil {
		e.t.Fatalf("connect %s: CONNACK %d: %v", d.id, code, err)
	}
	return c
}

func (c *client) sub(t testing.TB, filters ...string) {
	t.Helper()
	m := map[string]byte{}
	for _, f := range filters {
		m[f] = 1
	}
	tok := c.SubscribeMultiple(m, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %v: %v", filters, tok.Error())
	}
	for f, code := range tok.(*paho.SubscribeToken).Result() {
		if code == 0x80 {
			t.Fatalf("subscribe %s refused", f)
		}
	}
}

func (c *client) pub(t testing.TB, topic string, qos byte, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// recv waits for a message whose topic starts with prefix, skipping others.
func (c *client) recv(t testing.TB, prefix string) paho.Message {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-c.msgs:
			if strings.HasPrefix(m.Topic(), prefix) {
				return m
			}
		case <-deadline:
			t.Fatalf("no message on %s* within 5s", prefix)
			return nil
		}
	}
}

// none asserts that no message arrives on prefix for a short while.
func (c *client) none(t testing.TB, prefix string, wait time.Duration) {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case m := <-c.msgs:
			if strings.HasPrefix(m.Topic(), prefix) {
				t.Fatalf("unexpected message on %s: %s", m.Topic(), m.Payload())
			}
		case <-deadline:
			return
		}
	}
}

// waitLost waits for the hub to close the connection.
func (c *client) waitLost(t testing.TB) {
	t.Helper()
	select {
	case <-c.lost:
	case <-time.After(5 * time.Second):
		t.Fatal("the hub did not close the connection")
	}
}

// stillUp asserts that the connection survives a round trip.
func (c *client) stillUp(t testing.TB) {
	t.Helper()
	select {
	case err := <-c.lost:
		t.Fatalf("connection lost: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	if !c.IsConnectionOpen() {
		t.Fatal("connection is not open")
	}
}

// offline disconnects c and waits until the hub has noticed.
func (e *env) offline(c *client, id string) {
	e.t.Helper()
	c.Disconnect(0)
	eventually(e.t, id+" offline", func() bool {
		var v struct{ Connected bool }
		e.api("GET", "/hub/devices/"+id, nil, &v)
		return !v.Connected
	})
}

// telemetry reads the telemetry log.
func (e *env) telemetry() []map[string]any {
	e.t.Helper()
	f, err := os.Open(e.logPath)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			e.t.Fatalf("telemetry log line is not JSON: %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

// topicParam returns a query parameter of a $iothub topic.
func topicParam(topic, key string) string {
	_, q, _ := strings.Cut(topic, "?")
	v, _ := url.ParseQuery(q)
	return v.Get(key)
}

// status returns the status segment of $iothub/.../res/{status}/?...
func status(topic string) int {
	parts := strings.Split(topic, "/")
	for i, p := range parts {
		if p == "res" && i+1 < len(parts) {
			n, _ := strconv.Atoi(parts[i+1])
			return n
		}
	}
	return -1
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
