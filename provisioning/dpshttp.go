package provisioning

// DPS over HTTPS (azure-protocol §3): the REST API with the same
// api-version, CSR, retry-after, polling, error handling and chain
// validation as the MQTT path, for X.509 (client certificate in the TLS
// handshake), symmetric keys (SAS token in Authorization) and TPM
// attestation, which DPS offers over HTTPS and AMQP only.

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base32"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// DPS transports ([identity] dps_transport).
const (
	TransportMQTT  = "mqtt"
	TransportHTTPS = "https"
)

// TPMAttestor is a TPM that answers DPS's TPM attestation challenge
// (keystore/tpm2's Store). The HMAC key in the challenge never leaves it.
type TPMAttestor interface {
	// DPSPublics returns the EK and SRK public areas (TPM2B_PUBLIC).
	DPSPublics(ctx context.Context) (ek, srk []byte, err error)
	// DPSSign opens the challenge inside the TPM and returns
	// HMAC-SHA256(challenge key, data) computed by the TPM.
	DPSSign(ctx context.Context, challenge, data []byte) ([]byte, error)
}

// TPMCredential is TPM attestation: the TPM's endorsement key, recorded in
// an individual enrollment, is the onboarding credential.
type TPMCredential struct{ TPM TPMAttestor }

func (TPMCredential) isCredential() {}

// TPMRegistrationID is the registration id the Azure IoT SDKs derive from
// an endorsement key: base32 of SHA-256 over the EK's TPM2B_PUBLIC, without
// padding, in lower case.
func TPMRegistrationID(ek []byte) string {
	sum := sha256.Sum256(ek)
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:]))
}

// maxDPSBody bounds what we read of an answer (DPS's message limit).
const maxDPSBody = 96 << 10

// httpsDPS is one registration's REST client.
type httpsDPS struct {
	cfg  *DPSConfig
	conn *restConn
	base string // /{scope}/registrations/{id}
	auth string // Authorization header, once known
}

func newHTTPSDPS(cfg *DPSConfig) (*httpsDPS, error) {
	host, port := cfg.Endpoint, "443"
	if h, p, err := net.SplitHostPort(cfg.Endpoint); err == nil {
		host, port = h, p
	}
	var tlsCfg *tls.Config
	var err error
	if c, ok := cfg.Credential.(X509Credential); ok {
		tlsCfg, err = tlsconf.Client(host, cfg.Roots, c.Signer, c.Chain)
	} else {
		tlsCfg, err = tlsconf.Client(host, cfg.Roots, nil, nil)
	}
	if err != nil {
		return nil, retry.Permanent(fmt.Errorf("dps: %w", err))
	}
	tlsCfg.NextProtos = []string{"http/1.1"}
	hostHdr := host
	if port != "443" {
		hostHdr = net.JoinHostPort(host, port)
	}
	return &httpsDPS{
		cfg:  cfg,
		conn: &restConn{addr: net.JoinHostPort(host, port), host: hostHdr, tlsCfg: tlsCfg, proxy: cfg.Network.Proxy},
		base: "/" + url.PathEscape(cfg.IDScope) + "/registrations/" + url.PathEscape(cfg.RegistrationID),
	}, nil
}

// do sends one request and returns status, body and retry-after.
func (h *httpsDPS) do(ctx context.Context, method, path string, body []byte) (int, []byte, time.Duration, error) {
	hdr := map[string]string{"Accept": "application/json", "User-Agent": h.cfg.ClientVersion}
	if body != nil {
		hdr["Content-Type"] = "application/json; charset=utf-8"
	}
	if h.auth != "" {
		hdr["Authorization"] = h.auth
	}
	rsp, err := h.conn.roundTrip(ctx, method, h.base+path+"?api-version="+url.QueryEscape(h.cfg.APIVersion), hdr, body)
	if err != nil {
		if ctx.Err() != nil {
			return 0, nil, 0, ctx.Err()
		}
		var cve *tls.CertificateVerificationError
		if errors.As(err, &cve) {
			return 0, nil, 0, untrusted(h.cfg.Endpoint, cve)
		}
		if tlsconf.RejectedIdentity(err) {
			return 0, nil, 0, refusedInHandshake(h.cfg.Endpoint, err)
		}
		return 0, nil, 0, fmt.Errorf("dps: %s %s: %w", method, h.cfg.Endpoint, err)
	}
	var ra time.Duration
	if n, err := strconv.Atoi(strings.TrimSpace(rsp.header.Get("Retry-After"))); err == nil && n > 0 {
		ra = time.Duration(n) * time.Second
	}
	return rsp.status, rsp.body, ra, nil
}

// registerOnceHTTPS is one registration over REST: register (answering the
// TPM challenge when there is one), then poll until final.
func registerOnceHTTPS(ctx context.Context, cfg *DPSConfig, reqBody []byte, rng *rand.Rand) (*RegistrationState, error) {
	cfg.progress(Step{Kind: StepConnecting})
	h, err := newHTTPSDPS(cfg)
	if err != nil {
		return nil, err
	}
	defer h.conn.close()
	expiry := cfg.Clock.Now().Add(cfg.Timeout + time.Minute)
	tpmCred, isTPM := cfg.Credential.(TPMCredential)
	switch c := cfg.Credential.(type) {
	case SymmetricKey:
		h.auth = c.DPSToken(cfg.IDScope, cfg.RegistrationID, expiry)
	case TPMCredential:
		ek, srk, err := c.TPM.DPSPublics(ctx)
		if err != nil {
			return nil, retry.Permanent(fmt.Errorf("dps: %w", err))
		}
		if reqBody, err = withTPM(reqBody, ek, srk); err != nil {
			return nil, retry.Permanent(err)
		}
	case X509Credential:
	default:
		return nil, retry.Permanent(fmt.Errorf("dps: unsupported onboarding credential %T", cfg.Credential))
	}

	cfg.progress(Step{Kind: StepRegistering})
	status, body, ra, err := h.do(ctx, "PUT", "/register", reqBody)
	if err != nil {
		return nil, err
	}
	if isTPM && status == 401 {
		// The challenge: only this TPM can turn it into the key that signs
		// the token for the retry. A challenge the TPM refuses is final.
		var ch struct {
			AuthenticationKey string `json:"authenticationKey"`
		}
		if json.Unmarshal(body, &ch) != nil || ch.AuthenticationKey == "" {
			return nil, retry.Permanent(fmt.Errorf("dps: %w: %w", ErrCredentialRejected, decodeServiceError(status, 0, body)))
		}
		blob, err := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
		if err != nil {
			return nil, retry.Permanent(fmt.Errorf("dps: %w: the TPM challenge (authenticationKey) is not base64", ErrMalformedReply))
		}
		h.auth, err = sasToken(cfg.IDScope+"/registrations/"+cfg.RegistrationID, expiry, "registration",
			func(msg []byte) ([]byte, error) { return tpmCred.TPM.DPSSign(ctx, blob, msg) })
		if err != nil {
			return nil, retry.Permanent(fmt.Errorf("dps: TPM attestation: %w", err))
		}
		status, body, ra, err = h.do(ctx, "PUT", "/register", reqBody)
		if err != nil {
			return nil, err
		}
	}
	return pollUntilFinal(ctx, cfg, rng, status, ra, body, func(opID string) (int, time.Duration, []byte, error) {
		status, body, ra, err := h.do(ctx, "GET", "/operations/"+url.PathEscape(opID), nil)
		return status, ra, body, err
	})
}

// pollUntilFinal is the polling both transports share: interpret an
// answer, wait as DPS asked, fetch the operation's status with next, until
// DPS is final or fails. An answer of 429 to a poll (DPS allows 5 polls per
// 10 s per device) is waited out and the same operation polled again, up to
// maxThrottledPolls times in a row: registering anew would start a new
// operation and wait all over. Waits are retry.Policy.Wait on cfg.Clock.
func pollUntilFinal(ctx context.Context, cfg *DPSConfig, rng *rand.Rand, status int, retryAfter time.Duration, body []byte,
	next func(opID string) (int, time.Duration, []byte, error)) (*RegistrationState, error) {
	for polls := 0; ; polls++ {
		st, opID, err := outcome(cfg, status, retryAfter, body)
		if err != nil || st != nil {
			return st, err
		}
		// An operation still assigning is no failure: the wait is the one
		// DPS asked for (its pace, not ours); only when it asks for none
		// does the backoff grow with the polls.
		n := polls
		if retryAfter > 0 {
			n = 0
		}
		wait := cfg.Backoff.Wait(n, dpsHint(retryAfter), rng)
		cfg.progress(Step{Kind: StepWaiting, Wait: wait})
		if err := clock.Sleep(ctx, cfg.Clock, wait); err != nil {
			return nil, err
		}
		cfg.progress(Step{Kind: StepPolling})
		if status, retryAfter, body, err = next(opID); err != nil {
			return nil, err
		}
		for tries := 0; status == 429 && tries < maxThrottledPolls; tries++ {
			throttled := decodeServiceError(status, retryAfter, body)
			wait := cfg.Backoff.Wait(tries, throttled, rng) // the backoff counts the 429s in a row
			cfg.progress(Step{Kind: StepRetrying, Wait: wait, Err: throttled})
			if err := clock.Sleep(ctx, cfg.Clock, wait); err != nil {
				return nil, err
			}
			if status, retryAfter, body, err = next(opID); err != nil {
				return nil, err
			}
		}
	}
}

// maxThrottledPolls bounds the re-polls of one operation DPS throttles;
// then the 429 goes to Register, which registers anew.
const maxThrottledPolls = 10

// dpsHint is the retry-after of a DPS answer that is not an error (202
// assigning), as internal/retry reads and clamps retry-afters.
type dpsHint time.Duration

func (h dpsHint) Error() string             { return "DPS asked to wait " + time.Duration(h).String() }
func (h dpsHint) RetryAfter() time.Duration { return time.Duration(h) }

// withTPM adds the tpm object (EK and SRK, base64) to the register body.
func withTPM(reqBody, ek, srk []byte) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(reqBody, &m); err != nil {
		return nil, fmt.Errorf("dps: %w", err)
	}
	m["tpm"], _ = json.Marshal(map[string]string{
		"endorsementKey": base64.StdEncoding.EncodeToString(ek),
		"storageRootKey": base64.StdEncoding.EncodeToString(srk),
	})
	return json.Marshal(m)
}

// sasToken builds a SAS token for resource, its signature computed by sign
// over "{url-encoded resource}\n{expiry}" (a key in memory or in a TPM).
func sasToken(resource string, expiry time.Time, skn string, sign func([]byte) ([]byte, error)) (string, error) {
	sr := url.QueryEscape(resource)
	se := strconv.FormatInt(expiry.Unix(), 10)
	mac, err := sign([]byte(sr + "\n" + se))
	if err != nil {
		return "", err
	}
	t := "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(base64.StdEncoding.EncodeToString(mac)) + "&se=" + se
	if skn != "" {
		t += "&skn=" + skn
	}
	return t, nil
}

// hmacSHA256 signs with a key in memory (symmetric-key credentials).
func hmacSHA256(key []byte) func([]byte) ([]byte, error) {
	return func(msg []byte) ([]byte, error) {
		m := hmac.New(sha256.New, key)
		m.Write(msg)
		return m.Sum(nil), nil
	}
}

// outcome interprets one DPS answer the same way for both transports: the
// final registration state, or the operation to poll, or an error
// (permanent unless DPS answered 429 or 5xx; retry.IsPermanent).
func outcome(cfg *DPSConfig, status int, retryAfter time.Duration, body []byte) (*RegistrationState, string, error) {
	if status != 200 && status != 202 {
		de := decodeServiceError(status, retryAfter, body)
		switch {
		case !de.Permanent():
			return nil, "", de
		case status == 401 || status == 403:
			return nil, "", fmt.Errorf("dps: %w: %w", ErrCredentialRejected, de)
		}
		return nil, "", fmt.Errorf("dps: %w", de)
	}
	op, err := decodeOperation(body)
	if err != nil {
		return nil, "", retry.Permanent(err)
	}
	switch op.Status {
	case StatusAssigned:
		cfg.progress(Step{Kind: StepAssigned})
		return op.RegistrationState, "", nil
	case StatusFailed:
		rs := op.RegistrationState
		if rs == nil {
			rs = &RegistrationState{}
		}
		return nil, "", retry.Permanent(fmt.Errorf("dps: %w: error %d: %s; check the enrollment and its allocation policy in DPS", ErrRegistrationFailed, rs.ErrorCode, rs.ErrorMessage))
	case StatusDisabled:
		return nil, "", retry.Permanent(fmt.Errorf("dps: %w for registration id %q; enable the enrollment (or the device's registration) in DPS", ErrEnrollmentDisabled, cfg.RegistrationID))
	}
	// assigning / unassigned: poll (after the wait DPS asked for).
	return nil, op.OperationID, nil
}
