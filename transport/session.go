package transport

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/mqttconn"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// DefaultAPIVersion is the hub api-version gwagent sends: the one the SDKs
// that implement the certificate-signing API use (azure-protocol §2.5).
const DefaultAPIVersion = "2025-08-01-preview"

// Config describes one device connection to IoT Hub.
type Config struct {
	// Host is the hub as DPS assigned it: host, or host:port (default 8883).
	Host     string
	DeviceID string
	// APIVersion defaults to DefaultAPIVersion.
	APIVersion string
	// Roots verify the hub's server certificate. Required.
	Roots *x509.CertPool
	// Signer and Chain authenticate with X.509: the full chain, leaf first,
	// is presented in the handshake.
	Signer crypto.Signer
	Chain  []*x509.Certificate
	// SASToken, instead of Signer/Chain, returns a SAS token valid until the
	// given time (devices onboarded by symmetric key without a certificate).
	SASToken func(expiry time.Time) string
	// KeepAlive defaults to 240 s, the C SDK's value (the hub allows up to 1177 s).
	KeepAlive time.Duration
	// ClientVersion is sent as DeviceClientType.
	ClientVersion string
	// Handlers for what the hub sends. Each runs on its own goroutine and
	// must not block for long.
	OnDesired func(patch json.RawMessage, version int64)
	OnMethod  func(name string, payload []byte) (status int, response []byte)
	OnC2D     func(system, app map[string]string, body []byte)
	// OnCredentials receives certificate-signing answers that arrive with no
	// request waiting for them (a 200 after a reconnect).
	OnCredentials func(status int, rid string, body []byte)
	// Network is how to reach the hub: transport (MQTT on 8883, WebSockets
	// on 443, or auto), proxy, timeouts. Its Host and TLS are filled in
	// from Host and the credentials above.
	Network mqttconn.Options
	// Clock dates what the hub judges in its time: a SAS token's expiry,
	// the end of the wait for a certificate the hub gave (operationExpires);
	// default clock.Real. Waits on the network itself are bounded in wall
	// time, as the network runs in it.
	Clock clock.Clock
}

// Errors Dial classifies.
var (
	// ErrUnauthorized: the hub refused our identity (CONNACK 4 or 5). Do not
	// retry blindly: re-provision through DPS (azure-protocol §4.6).
	ErrUnauthorized = errors.New("hub refused the device's credentials")
	// ErrUnavailable: the hub refused for now (CONNACK 3): disabled device or
	// server unavailable. Retry with backoff.
	ErrUnavailable = errors.New("hub unavailable or device disabled")
	// ErrServerUntrusted: the hub's certificate failed verification.
	ErrServerUntrusted = errors.New("hub server certificate not trusted")
	// ErrClosed: the session is closed or its connection was lost.
	ErrClosed = errors.New("hub session closed")
)

// StatusError is a non-success answer to a twin or credentials request.
type StatusError struct {
	Status int
	Body   []byte
	// After is the hub's retry-after (zero if it sent none).
	After time.Duration
}

// RetryAfter is the hub's retry-after (internal/retry reads it).
func (e *StatusError) RetryAfter() time.Duration { return e.After }

func (e *StatusError) Error() string {
	if len(e.Body) > 0 {
		return fmt.Sprintf("hub answered %d: %s", e.Status, truncate(e.Body, 300))
	}
	return fmt.Sprintf("hub answered %d", e.Status)
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

// Session is one MQTT connection to the hub. When the connection drops,
// Done is closed and the session is finished: dial a new one (the agent does,
// with backoff), which subscribes again.
type Session struct {
	cfg    Config
	client mqtt.Client
	dialer *mqttconn.Dialer
	done   chan struct{}
	once   sync.Once
	calls  chan *call   // to caller, the one goroutine that calls into paho
	err    atomic.Value // error that ended the session

	mu             sync.Mutex
	pending        map[string]chan answer
	credSubscribed bool // $iothub/credentials/res/# (credentials.go)
	rid            atomic.Uint64
	ridSalt        string // tells this session's request ids from another's

	// requests and answers count what was asked of the hub on this
	// connection (telemetry, twin and certificate requests) and what it
	// answered (PUBACKs, answers): see Requests.
	requests, answers atomic.Int64
}

type answer struct {
	status int
	query  url.Values
	body   []byte
}

// Dial connects, subscribes to the five documented filters, and returns the
// session. It makes one attempt; errors wrap ErrUnauthorized,
// ErrUnavailable or ErrServerUntrusted where they apply.
func Dial(ctx context.Context, cfg Config) (*Session, error) {
	if cfg.APIVersion == "" {
		cfg.APIVersion = DefaultAPIVersion
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 240 * time.Second
	}
	if cfg.ClientVersion == "" {
		cfg.ClientVersion = "gwagent"
	}
	host := cfg.Host
	if h, _, err := net.SplitHostPort(cfg.Host); err == nil {
		host = h
	}
	var tlsCfg *tls.Config
	var err error
	if cfg.Signer != nil {
		tlsCfg, err = tlsconf.Client(host, cfg.Roots, cfg.Signer, cfg.Chain)
	} else {
		tlsCfg, err = tlsconf.Client(host, cfg.Roots, nil, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	cfg.Clock = clock.Or(cfg.Clock)
	s := &Session{cfg: cfg, done: make(chan struct{}), calls: make(chan *call, callQueue), pending: map[string]chan answer{},
		ridSalt: strconv.FormatUint(rand.Uint64()%(1<<30), 36)}

	// The username's hub name is the host without the port.
	opts := mqtt.NewClientOptions().
		SetClientID(cfg.DeviceID).
		SetUsername(host + "/" + cfg.DeviceID + "/?api-version=" + cfg.APIVersion + "&DeviceClientType=" + url.QueryEscape(cfg.ClientVersion)).
		SetProtocolVersion(4).
		// CleanSession=0 keeps C2D queued across reconnects (azure-protocol §4.1).
		SetCleanSession(false).
		SetKeepAlive(cfg.KeepAlive).
		SetPingTimeout(30 * time.Second).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(false).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { s.finish(err) })
	if cfg.SASToken != nil {
		opts.SetPassword(cfg.SASToken(cfg.Clock.Now().Add(time.Hour)))
	}
	nw := cfg.Network
	nw.Host, nw.TLS = cfg.Host, tlsCfg
	// The dial is bounded by ctx; the session outlives it.
	if s.dialer, err = mqttconn.Configure(ctx, opts, nw); err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	s.client = mqtt.NewClient(opts)
	tok := s.client.Connect()
	select {
	case <-ctx.Done():
		s.client.Disconnect(0)
		return nil, ctx.Err()
	case <-tok.Done():
	}
	if err := tok.Error(); err != nil {
		return nil, classifyConnect(cfg.Host, err)
	}
	go s.caller()
	// $iothub/credentials/res/# is subscribed only while renewing
	// (credentials.go), as Microsoft's SDKs do: a hub without certificate
	// management refuses it, and static-mode devices must still work there.
	subs := map[string]byte{
		twinResSub: 0, twinDesiredSub: 0, methodsSub: 0, c2dSub(cfg.DeviceID): 1,
	}
	if err := s.subscribe(ctx, subs); err != nil {
		s.client.Disconnect(0)
		s.finish(err)
		return nil, err
	}
	return s, nil
}

// callQueue is how many paho calls may wait for the caller goroutine: a
// drain window's publishes go in as fast as paho takes them.
const callQueue = 16

// call is one call into paho that may block. paho v1's Publish, Subscribe
// and Unsubscribe hand the packet to its writer and wait for it to be
// taken, for up to its write timeout (30 s), with no way to cancel; when
// the connection is lost while a call waits, nothing takes the packet and
// the call sits out the whole timeout. A drain at full speed is nearly
// always inside Publish when a hub closes the connection (a throttled
// send, a dropped link), and the session's end then took 30 s to reach the
// agent. So the session makes these calls on one goroutine of its own, in
// the order they were asked for, and whoever waits for one watches the
// session's end as well.
type call struct {
	topic string
	qos   byte
	body  []byte
	other func() mqtt.Token // a subscribe or unsubscribe instead of a publish
	tok   mqtt.Token
	ready chan struct{} // closed once tok is set
}

// caller makes the session's paho calls until the session ends. One may
// still be waiting in paho then: it returns within paho's write timeout.
func (s *Session) caller() {
	for {
		select {
		case c := <-s.calls:
			if c.other != nil {
				c.tok = c.other()
			} else {
				c.tok = s.client.Publish(c.topic, c.qos, false, c.body)
			}
			close(c.ready)
		case <-s.done:
			return
		}
	}
}

// start queues c for the caller goroutine.
func (s *Session) start(c *call) *call {
	c.ready = make(chan struct{})
	select {
	case s.calls <- c:
	case <-s.done:
	}
	return c
}

// token waits for c's paho call to return; ErrClosed when the session
// ended first. With a done ctx it still reports a call that has returned.
func (s *Session) token(ctx context.Context, c *call) (mqtt.Token, error) {
	select {
	case <-c.ready:
		return c.tok, nil
	default:
	}
	select {
	case <-c.ready:
		return c.tok, nil
	case <-s.done:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// do makes c's paho call and waits for it to complete, at most d (a bound
// on network I/O, in wall time) once paho has taken it, or until ctx or
// the session ends. The token is returned for its result.
func (s *Session) do(ctx context.Context, c *call, d time.Duration) (mqtt.Token, error) {
	tok, err := s.token(ctx, s.start(c))
	if err != nil {
		return nil, err
	}
	if !s.waitToken(ctx, tok, d) {
		if s.ended() {
			return nil, ErrClosed
		}
		return nil, tokenErr(tok)
	}
	return tok, tok.Error()
}

// subscribe subscribes and checks every SUBACK return code: paho v1 records
// a refused filter (0x80) in the token's Result without an error.
func (s *Session) subscribe(ctx context.Context, subs map[string]byte) error {
	st, err := s.do(ctx, &call{other: func() mqtt.Token { return s.client.SubscribeMultiple(subs, s.route) }}, 30*time.Second)
	if err != nil {
		return fmt.Errorf("hub: subscribe: %w", err)
	}
	return subackErr(st.(*mqtt.SubscribeToken).Result(), subs)
}

func classifyConnect(host string, err error) error {
	switch {
	case errors.Is(err, packets.ErrorRefusedNotAuthorised), errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword),
		errors.Is(err, packets.ErrorRefusedIDRejected):
		return fmt.Errorf("hub %s: %w (%v)", host, ErrUnauthorized, err)
	case errors.Is(err, packets.ErrorRefusedServerUnavailable):
		return fmt.Errorf("hub %s: %w (%v)", host, ErrUnavailable, err)
	}
	var cve *tls.CertificateVerificationError
	if errors.As(err, &cve) {
		return fmt.Errorf("hub %s: %w: %v; check trust_bundle", host, ErrServerUntrusted, cve.Err)
	}
	return fmt.Errorf("hub %s: connect: %w", host, err)
}

// waitToken waits for a paho operation at most d (a bound on network I/O,
// in wall time), or until ctx or the session ends.
func (s *Session) waitToken(ctx context.Context, t mqtt.Token, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	select {
	case <-t.Done():
		return true
	case <-s.done:
		return false
	case <-ctx.Done():
		return false
	}
}

func tokenErr(t mqtt.Token) error {
	select {
	case <-t.Done():
		return t.Error()
	default:
		return errors.New("timed out")
	}
}

func (s *Session) finish(err error) {
	s.once.Do(func() {
		if err == nil {
			err = ErrClosed
		}
		s.err.Store(err)
		close(s.done)
	})
}

// Transport is what the session's connection runs over: mqttconn.MQTT or
// mqttconn.WebSocket.
func (s *Session) Transport() mqttconn.Transport { return s.dialer.Used() }

// Done is closed when the connection is gone.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended, or nil while it is up.
func (s *Session) Err() error {
	if e, ok := s.err.Load().(error); ok {
		return e
	}
	return nil
}

// Requests reports how many telemetry messages and twin or certificate
// requests were sent on this connection, and how many of them the hub
// answered (a PUBACK, an answer). The hub gives no reason on MQTT when it
// refuses a message (no negative PUBACK): it closes the connection; over
// its daily quota it does so at the first message or twin request of
// every connection. Answered 0 with requests sent, on a connection that
// ended, is that pattern (docs/azure-fidelity.md).
func (s *Session) Requests() (sent, answered int64) { return s.requests.Load(), s.answers.Load() }

// Close disconnects politely (no will message is sent).
func (s *Session) Close() {
	s.client.Disconnect(250)
	s.finish(ErrClosed)
}

// route dispatches every message the hub sends.
func (s *Session) route(_ mqtt.Client, m mqtt.Message) {
	topic := m.Topic()
	body := append([]byte(nil), m.Payload()...)
	switch {
	case strings.HasPrefix(topic, twinResPrefix):
		if st, q, ok := parseStatusTopic(topic, twinResPrefix); ok {
			s.deliver(q.Get("$rid"), answer{status: st, query: q, body: body})
		}
	case strings.HasPrefix(topic, credentialsRes):
		if st, q, ok := parseStatusTopic(topic, credentialsRes); ok {
			if !s.deliver(q.Get("$rid"), answer{status: st, query: q, body: body}) && s.cfg.OnCredentials != nil {
				s.cfg.OnCredentials(st, q.Get("$rid"), body)
			}
		}
	case strings.HasPrefix(topic, desiredPrefix):
		if s.cfg.OnDesired != nil {
			v, _ := url.ParseQuery(strings.TrimPrefix(strings.TrimPrefix(topic, desiredPrefix), "?"))
			ver, _ := strconv.ParseInt(v.Get("$version"), 10, 64)
			s.cfg.OnDesired(body, ver)
		}
	case strings.HasPrefix(topic, methodPrefix):
		s.method(topic, body)
	case strings.HasPrefix(topic, "devices/"+s.cfg.DeviceID+"/messages/devicebound/"):
		if s.cfg.OnC2D != nil {
			sys, app := DecodeProperties(topic[len("devices/"+s.cfg.DeviceID+"/messages/devicebound/"):])
			s.cfg.OnC2D(sys, app, body)
		}
	}
}

// method answers $iothub/methods/POST/{name}/?$rid={rid}.
func (s *Session) method(topic string, body []byte) {
	rest := topic[len(methodPrefix):]
	name, query, ok := strings.Cut(rest, "/?")
	if !ok {
		return
	}
	q, _ := url.ParseQuery(query)
	rid := q.Get("$rid")
	status, resp := 501, []byte(`{"error":"method not implemented"}`)
	if s.cfg.OnMethod != nil {
		status, resp = s.cfg.OnMethod(name, body)
	}
	s.start(&call{topic: methodResTopic + strconv.Itoa(status) + "/?$rid=" + url.QueryEscape(rid), body: resp})
}

func (s *Session) deliver(rid string, a answer) bool {
	s.mu.Lock()
	ch, ok := s.pending[rid]
	s.mu.Unlock()
	if ok {
		s.answers.Add(1)
		select {
		case ch <- a:
		default: // a second answer to the same rid (e.g. 202 then 200) queues up to the channel's size
		}
	}
	return ok
}

func (s *Session) newRID() string {
	return "gw" + strconv.FormatUint(s.rid.Add(1), 10) + "x" + s.ridSalt
}

// request publishes to topic+rid and waits for the answers that match rid;
// it returns when want(answer) says done.
func (s *Session) request(ctx context.Context, topic, rid string, payload []byte, want func(answer) bool) (answer, error) {
	ch, done := s.expect(rid)
	defer done()
	if err := s.publishRequest(ctx, topic, rid, payload); err != nil {
		return answer{}, err
	}
	for {
		a, err := s.next(ctx, ch)
		if err != nil || want(a) {
			return a, err
		}
	}
}

// expect registers rid for answers; call done when no longer waiting.
func (s *Session) expect(rid string) (ch chan answer, done func()) {
	ch = make(chan answer, 4)
	s.mu.Lock()
	s.pending[rid] = ch
	s.mu.Unlock()
	return ch, func() {
		s.mu.Lock()
		delete(s.pending, rid)
		s.mu.Unlock()
	}
}

func (s *Session) publishRequest(ctx context.Context, topic, rid string, payload []byte) error {
	s.requests.Add(1)
	if _, err := s.do(ctx, &call{topic: topic + url.QueryEscape(rid), body: payload}, 30*time.Second); err != nil {
		return fmt.Errorf("hub: publish %s: %w", topic, err)
	}
	return nil
}

// ended reports whether the connection has ended.
func (s *Session) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// next waits for one answer on ch.
func (s *Session) next(ctx context.Context, ch chan answer) (answer, error) {
	select {
	case <-ctx.Done():
		return answer{}, ctx.Err()
	case <-s.done:
		return answer{}, fmt.Errorf("hub: %w while waiting for an answer", ErrClosed)
	case a := <-ch:
		return a, nil
	}
}

// SendTelemetry publishes a device-to-cloud message at QoS 1 and returns
// once the hub acknowledged it (PUBACK). system holds system properties
// without "$." (mid, ct, ce, ...), app the application properties.
func (s *Session) SendTelemetry(ctx context.Context, body []byte, system, app map[string]string) error {
	return s.PublishTelemetry(body, system, app)(ctx)
}

// PublishTelemetry starts a QoS 1 publish and returns a function that waits
// for its PUBACK. Publishing several before waiting pipelines them; MQTT
// keeps their order on the connection.
func (s *Session) PublishTelemetry(body []byte, system, app map[string]string) (wait func(context.Context) error) {
	select {
	case <-s.done:
		return func(context.Context) error { return ErrClosed }
	default:
	}
	topic := telemetryTopic(s.cfg.DeviceID, system, app)
	s.requests.Add(1)
	c := s.start(&call{topic: topic, qos: 1, body: body})
	var answered atomic.Bool
	return func(ctx context.Context) error {
		tok, err := s.token(ctx, c)
		if errors.Is(err, ErrClosed) {
			return fmt.Errorf("hub: telemetry: %w before PUBACK", ErrClosed)
		} else if err != nil {
			return err
		}
		err = s.waitPuback(ctx, tok)
		if err == nil && answered.CompareAndSwap(false, true) {
			s.answers.Add(1)
		}
		return err
	}
}

// waitPuback waits for tok's PUBACK; with a context that is already done
// it still reports a PUBACK that has arrived (a non-blocking check).
func (s *Session) waitPuback(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return fmt.Errorf("hub: telemetry: %w", err)
		}
		return nil
	default:
	}
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return fmt.Errorf("hub: telemetry: %w", err)
		}
		return nil
	case <-s.done:
		return fmt.Errorf("hub: telemetry: %w before PUBACK", ErrClosed)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Twin is the device twin document.
type Twin struct {
	Desired  json.RawMessage `json:"desired"`
	Reported json.RawMessage `json:"reported"`
}

// GetTwin fetches the full twin.
func (s *Session) GetTwin(ctx context.Context) (*Twin, error) {
	a, err := s.request(ctx, twinGetTopic, s.newRID(), nil, func(answer) bool { return true })
	if err != nil {
		return nil, err
	}
	if a.status != 200 {
		return nil, &StatusError{Status: a.status, Body: a.body, After: retryAfter(a)}
	}
	var t Twin
	if err := json.Unmarshal(a.body, &t); err != nil {
		return nil, fmt.Errorf("hub: twin: %w", err)
	}
	return &t, nil
}

// PatchReported sends a reported-properties patch and returns the new
// reported version.
func (s *Session) PatchReported(ctx context.Context, patch any) (int64, error) {
	b, err := json.Marshal(patch)
	if err != nil {
		return 0, err
	}
	a, err := s.request(ctx, twinPatchTopic, s.newRID(), b, func(answer) bool { return true })
	if err != nil {
		return 0, err
	}
	if a.status != 204 && a.status != 200 {
		return 0, &StatusError{Status: a.status, Body: a.body, After: retryAfter(a)}
	}
	v, _ := strconv.ParseInt(a.query.Get("$version"), 10, 64)
	return v, nil
}

func retryAfter(a answer) time.Duration {
	for k, v := range a.query {
		if strings.EqualFold(k, "retry-after") && len(v) > 0 {
			if n, err := strconv.Atoi(v[0]); err == nil && n > 0 {
				return time.Duration(n) * time.Second
			}
		}
	}
	var body struct {
		RetryAfter int `json:"retryAfter"`
	}
	if json.Unmarshal(a.body, &body) == nil && body.RetryAfter > 0 {
		return time.Duration(body.RetryAfter) * time.Second
	}
	return 0
}
