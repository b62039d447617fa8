package provisioning

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
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/mqttconn"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// DefaultAPIVersion is the DPS api-version that carries a CSR and returns
// issuedCertificateChain (azure-protocol §2.1).
const DefaultAPIVersion = "2025-07-01-preview"

// Credential is the onboarding credential DPS authenticates the device with:
// an X509Credential, a SymmetricKey or a TPMCredential.
type Credential interface{ isCredential() }

// X509Credential is a factory onboarding certificate: its key (which never
// leaves its key store) and the chain, leaf first with every intermediate,
// as the factory installed it.
type X509Credential struct {
	Signer crypto.Signer
	Chain  []*x509.Certificate
}

func (X509Credential) isCredential() {}
func (SymmetricKey) isCredential()   {}

// DPSConfig says where and as whom to register.
type DPSConfig struct {
	// Endpoint is the DPS host, optionally with :port (default 8883 for
	// MQTT, 443 for HTTPS).
	Endpoint string
	// Transport is TransportMQTT (default) or TransportHTTPS; TPM
	// attestation needs HTTPS.
	Transport      string
	IDScope        string
	RegistrationID string
	// APIVersion defaults to DefaultAPIVersion.
	APIVersion string
	// Roots verify DPS's server certificate. Required.
	Roots      *x509.CertPool
	Credential Credential
	// Payload is optional custom allocation data.
	Payload json.RawMessage
	// Timeout bounds the whole registration (default 5 minutes).
	Timeout time.Duration
	// Backoff paces retries and polls (default 1 s to 60 s, jittered); a
	// retry-after DPS sends is honoured when it is longer (retry.Policy.Wait
	// says how, and clamps it).
	Backoff retry.Policy
	// Clock times the waits and the SAS tokens' expiry; nil: clock.Real.
	Clock clock.Clock
	// Progress, if set, is told each step as it happens.
	Progress func(Step)
	// ClientVersion goes into the username's ClientVersion (user agent).
	ClientVersion string
	// Network is how to reach DPS: transport (MQTT on 8883, WebSockets on
	// 443, or auto), proxy, timeouts. Its Host and TLS are filled in from
	// Endpoint and the credential.
	Network mqttconn.Options
}

// StepKind names a provisioning step for progress output.
type StepKind int

const (
	StepConnecting StepKind = iota
	StepRegistering
	StepWaiting // DPS asked us to wait (Step.Wait) before polling
	StepPolling
	StepRetrying // a transient error; Step.Err says which, Step.Wait how long
	StepAssigned
)

// Step is one progress event.
type Step struct {
	Kind StepKind
	Wait time.Duration
	Err  error
}

func (s Step) String() string {
	switch s.Kind {
	case StepConnecting:
		return "connecting to DPS"
	case StepRegistering:
		return "registering"
	case StepWaiting:
		return fmt.Sprintf("DPS is assigning; waiting %s as it asked", s.Wait.Round(time.Millisecond))
	case StepPolling:
		return "polling registration status"
	case StepRetrying:
		return fmt.Sprintf("retrying in %s: %v", s.Wait.Round(time.Millisecond), s.Err)
	case StepAssigned:
		return "assigned"
	}
	return "?"
}

// Errors a caller branches on.
var (
	// ErrCredentialRejected: DPS refused the onboarding credential (CONNACK
	// refusal, 401, 403, a TLS alert about its certificate). Retrying with
	// the same credential cannot help.
	ErrCredentialRejected = errors.New("onboarding credential rejected by DPS")
	// ErrRegistrationFailed: DPS finished with status failed.
	ErrRegistrationFailed = errors.New("DPS registration failed")
	// ErrEnrollmentDisabled: DPS finished with status disabled.
	ErrEnrollmentDisabled = errors.New("enrollment disabled in DPS")
)

// Register registers the device with DPS over MQTT and returns the final
// registration state when DPS assigns it. csrDER, if non-nil, is sent as the
// csr field so DPS issues an operational certificate. Failures are retried
// with backoff within cfg.Timeout (a new connection each time), except the
// permanent ones (retry.IsPermanent: a rejected credential, 4xx, final
// failed/disabled, a configuration that cannot work), returned at once.
func Register(ctx context.Context, cfg DPSConfig, csrDER []byte) (*RegistrationState, error) {
	cfg.defaults()
	if err := cfg.check(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()

	body := map[string]any{"registrationId": cfg.RegistrationID}
	if len(cfg.Payload) > 0 {
		body["payload"] = cfg.Payload
	}
	if csrDER != nil {
		body["csr"] = EncodeCSR(csrDER)
	}
	reqBody, _ := json.Marshal(body)

	rng := rand.New(rand.NewPCG(uint64(cfg.Clock.Now().UnixNano()), 0x9e3779b97f4a7c15))
	once := registerOnce
	if cfg.Transport == TransportHTTPS {
		once = registerOnceHTTPS // dpshttp.go
	}
	var st *RegistrationState
	err := retry.Loop{Policy: cfg.Backoff, Clock: cfg.Clock, Rand: rng,
		OnRetry: func(err error, _ int, wait time.Duration) {
			cfg.progress(Step{Kind: StepRetrying, Wait: wait, Err: err})
		},
	}.Do(ctx, func(ctx context.Context) (err error) {
		st, err = once(ctx, &cfg, reqBody, rng)
		return err
	})
	switch {
	case err == nil:
		return st, nil
	case ctx.Err() != nil && !retry.IsPermanent(err):
		return nil, fmt.Errorf("dps: gave up after %s: %w", cfg.Timeout, err)
	}
	return nil, err
}

func (c *DPSConfig) defaults() {
	if c.APIVersion == "" {
		c.APIVersion = DefaultAPIVersion
	}
	if c.Timeout == 0 {
		c.Timeout = 5 * time.Minute
	}
	if c.Backoff.Min == 0 {
		c.Backoff = retry.Policy{Min: time.Second, Max: time.Minute}
	}
	c.Clock = clock.Or(c.Clock)
	if c.ClientVersion == "" {
		c.ClientVersion = "gwagent"
	}
	if c.Transport == "" {
		c.Transport = TransportMQTT
		if _, tpm := c.Credential.(TPMCredential); tpm {
			c.Transport = TransportHTTPS
		}
	}
}

func (c *DPSConfig) check() error {
	switch {
	case c.Endpoint == "":
		return errors.New("dps: no endpoint; set [dps] endpoint (e.g. global.azure-devices-provisioning.net)")
	case c.IDScope == "":
		return errors.New("dps: no id scope; set [dps] id_scope from the DPS overview page")
	case c.Roots == nil:
		return errors.New("dps: no trust bundle; set trust_bundle")
	case c.Credential == nil:
		return errors.New("dps: no onboarding credential configured")
	case c.Transport != TransportMQTT && c.Transport != TransportHTTPS:
		return fmt.Errorf("dps: transport %q: use %q or %q", c.Transport, TransportMQTT, TransportHTTPS)
	}
	if _, tpm := c.Credential.(TPMCredential); tpm && c.Transport != TransportHTTPS {
		return errors.New("dps: TPM attestation works over HTTPS only (DPS does not offer it over MQTT); set [identity] dps_transport = \"https\"")
	}
	return ValidateRegistrationID(c.RegistrationID)
}

func (c *DPSConfig) progress(s Step) {
	if c.Progress != nil {
		c.Progress(s)
	}
}

// refusedInHandshake is DPS refusing the onboarding certificate with a TLS
// alert (tlsconf.RejectedIdentity) instead of a CONNACK or 401: permanent,
// like them, since the same certificate will be refused again.
func refusedInHandshake(endpoint string, err error) error {
	return retry.Permanent(fmt.Errorf("dps: %s refused the onboarding certificate in the TLS handshake: %w (%v); check that an enrollment for this device exists and is enabled, and that it trusts the factory certificate chain in [onboarding] (the enrollment group's CA, or the individual enrollment's certificate)",
		endpoint, ErrCredentialRejected, err))
}

// untrusted is DPS's server certificate failing verification: permanent,
// the trust bundle or the endpoint name is wrong.
func untrusted(endpoint string, cve *tls.CertificateVerificationError) error {
	return retry.Permanent(fmt.Errorf("dps: %s presented a certificate our trust bundle does not accept (%v); check trust_bundle and the endpoint name", endpoint, cve.Err))
}

// registerOnce is one connection: register, then poll until final.
func registerOnce(ctx context.Context, cfg *DPSConfig, reqBody []byte, rng *rand.Rand) (*RegistrationState, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cfg.progress(Step{Kind: StepConnecting})
	sess, err := connectDPS(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer sess.client.Disconnect(250)

	rid := 0
	send := func(topic, suffix string, payload []byte) (response, []byte, error) {
		rid++
		r := strconv.Itoa(rid)
		tok := sess.client.Publish(topic+r+suffix, 1, false, payload)
		if !tok.WaitTimeout(30 * time.Second) {
			return response{}, nil, errors.New("dps: publish not acknowledged in 30 s")
		}
		if err := tok.Error(); err != nil {
			return response{}, nil, fmt.Errorf("dps: publish: %w", err)
		}
		for {
			select {
			case <-ctx.Done():
				return response{}, nil, ctx.Err()
			case <-sess.lost:
				return response{}, nil, errors.New("dps: connection lost while waiting for the answer")
			case m := <-sess.replies:
				if m.resp.rid != r {
					continue // an answer to an earlier request
				}
				return m.resp, m.body, nil
			}
		}
	}

	cfg.progress(Step{Kind: StepRegistering})
	resp, body, err := send(dpsRegisterTopic, "", reqBody)
	if err != nil {
		return nil, err
	}
	return pollUntilFinal(ctx, cfg, rng, resp.status, resp.retryAfter, body, func(opID string) (int, time.Duration, []byte, error) {
		resp, body, err := send(dpsPollTopic, "&operationId="+url.QueryEscape(opID), nil)
		return resp.status, resp.retryAfter, body, err
	})
}

type reply struct {
	resp response
	body []byte
}

// dpsSession is one MQTT connection to DPS. Replies arrive on replies; lost
// is closed when the connection drops.
type dpsSession struct {
	client  mqtt.Client
	replies chan reply
	lost    chan struct{}
}

// connectDPS opens the MQTT session: client id = registration id, username
// {idScope}/registrations/{id}/api-version=..&ClientVersion=.., TLS 1.2+
// with the server verified, the X.509 onboarding chain presented in the
// handshake or a short-lived SAS token as password; then it subscribes to
// the response topics.
func connectDPS(ctx context.Context, cfg *DPSConfig) (*dpsSession, error) {
	host := cfg.Endpoint
	if h, _, err := net.SplitHostPort(cfg.Endpoint); err == nil {
		host = h
	}
	var tlsCfg, err = tlsconf.Client(host, cfg.Roots, nil, nil)
	if err != nil {
		return nil, retry.Permanent(fmt.Errorf("dps: %w", err))
	}
	opts := mqtt.NewClientOptions().
		SetClientID(cfg.RegistrationID).
		SetUsername(cfg.IDScope + "/registrations/" + cfg.RegistrationID + "/api-version=" + cfg.APIVersion +
			"&ClientVersion=" + url.QueryEscape(cfg.ClientVersion)).
		SetCleanSession(true).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(60 * time.Second).
		SetOrderMatters(false)
	switch c := cfg.Credential.(type) {
	case X509Credential:
		tlsCfg, err = tlsconf.Client(host, cfg.Roots, c.Signer, c.Chain)
		if err != nil {
			return nil, retry.Permanent(fmt.Errorf("dps: %w", err))
		}
	case SymmetricKey:
		// Short-lived: the token only has to outlive the registration.
		opts.SetPassword(c.DPSToken(cfg.IDScope, cfg.RegistrationID, cfg.Clock.Now().Add(cfg.Timeout+time.Minute)))
	default:
		return nil, retry.Permanent(fmt.Errorf("dps: unsupported onboarding credential %T", cfg.Credential))
	}
	nw := cfg.Network
	nw.Host, nw.TLS = cfg.Endpoint, tlsCfg
	if _, err := mqttconn.Configure(ctx, opts, nw); err != nil {
		return nil, retry.Permanent(fmt.Errorf("dps: %w", err))
	}

	replies := make(chan reply, 8)
	lost := make(chan struct{})
	opts.SetConnectionLostHandler(func(mqtt.Client, error) { close(lost) })
	client := mqtt.NewClient(opts)
	tok := client.Connect()
	select {
	case <-ctx.Done():
		client.Disconnect(0)
		return nil, ctx.Err()
	case <-tok.Done():
	}
	if err := tok.Error(); err != nil {
		switch {
		case errors.Is(err, packets.ErrorRefusedNotAuthorised), errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword),
			errors.Is(err, packets.ErrorRefusedIDRejected):
			return nil, retry.Permanent(fmt.Errorf("dps: connect to %s: %w (%v): check the id scope, the registration id and the onboarding certificate or key", cfg.Endpoint, ErrCredentialRejected, err))
		}
		var cve *tls.CertificateVerificationError
		if errors.As(err, &cve) {
			return nil, untrusted(cfg.Endpoint, cve)
		}
		if tlsconf.RejectedIdentity(err) {
			return nil, refusedInHandshake(cfg.Endpoint, err)
		}
		return nil, fmt.Errorf("dps: connect to %s: %w", cfg.Endpoint, err)
	}
	// Forward answers without blocking paho past the connection's or the
	// caller's end.
	handler := func(_ mqtt.Client, m mqtt.Message) {
		r, err := parseResponseTopic(m.Topic())
		if err != nil {
			return
		}
		select {
		case replies <- reply{resp: r, body: append([]byte(nil), m.Payload()...)}:
		case <-lost:
		case <-ctx.Done():
		}
	}
	sub := client.Subscribe(dpsSubscribe, 1, handler)
	if !sub.WaitTimeout(30*time.Second) || sub.Error() != nil {
		client.Disconnect(0)
		return nil, fmt.Errorf("dps: subscribe to %s failed: %v", dpsSubscribe, sub.Error())
	}
	return &dpsSession{client: client, replies: replies, lost: lost}, nil
}
