package hub

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim/identity"
)

// connectUser is a parsed CONNECT username
// {hostName}/{deviceId}/?api-version=...[&DeviceClientType=...].
type connectUser struct {
	host       string
	deviceID   string
	apiVersion string
}

func parseUsername(u string) (connectUser, error) {
	path, query, hasQuery := strings.Cut(u, "/?")
	if !hasQuery {
		return connectUser{}, fmt.Errorf("username %q is not {hostName}/{deviceId}/?api-version=...", u)
	}
	host, id, ok := strings.Cut(path, "/")
	if !ok || host == "" || id == "" || strings.Contains(id, "/") {
		return connectUser{}, fmt.Errorf("username %q is not {hostName}/{deviceId}/?api-version=... (modules are not emulated)", u)
	}
	q, err := url.ParseQuery(query)
	if err != nil {
		return connectUser{}, fmt.Errorf("username %q: bad query: %w", u, err)
	}
	av := q.Get("api-version")
	if av == "" {
		return connectUser{}, fmt.Errorf("username %q has no api-version; Azure documents it as required", u)
	}
	return connectUser{host: host, deviceID: id, apiVersion: av}, nil
}

// hostOnly drops a port and lower-cases, for comparing host names.
func hostOnly(hp string) string {
	if h, _, err := net.SplitHostPort(hp); err == nil {
		hp = h
	}
	return strings.ToLower(hp)
}

// sasToken is a parsed "SharedAccessSignature sr=..&sig=..&se=..".
type sasToken struct {
	srRaw string // as sent (URL-encoded), part of the signed string
	sr    string
	sig   string
	se    int64
	seRaw string
	skn   string
}

func parseSAS(tok string) (sasToken, error) {
	rest, ok := strings.CutPrefix(tok, "SharedAccessSignature ")
	if !ok {
		return sasToken{}, errors.New("password is not a SharedAccessSignature token")
	}
	var t sasToken
	for _, kv := range strings.Split(rest, "&") {
		k, v, _ := strings.Cut(kv, "=")
		dv, err := url.QueryUnescape(v)
		if err != nil {
			return sasToken{}, fmt.Errorf("SAS token field %q is not URL-encoded correctly", k)
		}
		switch k {
		case "sr":
			t.srRaw, t.sr = v, dv
		case "sig":
			t.sig = dv
		case "se":
			t.seRaw = dv
			n, err := strconv.ParseInt(dv, 10, 64)
			if err != nil {
				return sasToken{}, errors.New("SAS token se is not a unix time")
			}
			t.se = n
		case "skn":
			t.skn = dv
		default:
			return sasToken{}, fmt.Errorf("SAS token has unknown field %q", k)
		}
	}
	if t.sr == "" || t.sig == "" || t.seRaw == "" {
		return sasToken{}, errors.New("SAS token lacks sr, sig or se")
	}
	return t, nil
}

// checkSAS verifies a device SAS token against the device's key. It returns
// the token's expiry. hosts are the names the hub answers to.
func checkSAS(password string, d *device, hosts []string, now time.Time) (time.Time, error) {
	t, err := parseSAS(password)
	if err != nil {
		return time.Time{}, err
	}
	if t.skn != "" {
		return time.Time{}, errors.New("SAS token names a shared access policy (skn); devices sign with their own key and send no skn")
	}
	host, rest, ok := strings.Cut(t.sr, "/devices/")
	if !ok || rest != d.ID && rest != d.ID+"/" {
		return time.Time{}, fmt.Errorf("SAS token sr %q is not {hostName}/devices/%s", t.sr, d.ID)
	}
	known := false
	for _, hn := range hosts {
		if hn != "" && hostOnly(host) == hostOnly(hn) {
			known = true
		}
	}
	if !known {
		return time.Time{}, fmt.Errorf("SAS token sr %q names another hub", t.sr)
	}
	exp := time.Unix(t.se, 0)
	if !now.Before(exp) {
		return time.Time{}, fmt.Errorf("SAS token expired at %s", exp.UTC().Format(time.RFC3339))
	}
	key, err := base64.StdEncoding.DecodeString(d.PrimaryKey)
	if err != nil {
		return time.Time{}, errors.New("device key in the registry is not base64")
	}
	// The signed string is the URL-encoded resource URI, a newline, expiry.
	// SDKs encode sr the same way they send it, so sign what was sent.
	want := sasSignature(key, t.srRaw, t.seRaw)
	if subtle.ConstantTimeCompare([]byte(want), []byte(t.sig)) != 1 {
		// Some clients send sr unencoded; accept the canonical encoding too.
		alt := sasSignature(key, url.QueryEscape(t.sr), t.seRaw)
		if subtle.ConstantTimeCompare([]byte(alt), []byte(t.sig)) != 1 {
			return time.Time{}, errors.New("SAS token signature does not match the device key")
		}
	}
	return exp, nil
}

func sasSignature(key []byte, sr, se string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sr + "\n" + se))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// checkCertificate authenticates an X.509 device from the chain it
// presented in the TLS handshake (leaf first).
func (h *Hub) checkCertificate(d *device, chain []*x509.Certificate, roots *x509.CertPool, now time.Time) error {
	if len(chain) == 0 {
		return errors.New("no client certificate was presented in the TLS handshake; X.509 devices must send their certificate chain")
	}
	leaf := chain[0]
	switch d.Auth {
	case identity.AuthSelfSigned:
		if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
			return fmt.Errorf("certificate is not valid now (valid %s to %s)", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		s256 := sha256.Sum256(leaf.Raw)
		s1 := sha1.Sum(leaf.Raw)
		for _, t := range d.Thumbprints {
			if t == hex.EncodeToString(s256[:]) || t == hex.EncodeToString(s1[:]) {
				return nil
			}
		}
		return errors.New("certificate thumbprint matches none registered for the device")
	case identity.AuthCA:
		// DPS-issued certificates of a device whose individual enrollment
		// sets another device id keep the registration id as CN.
		if cn := leaf.Subject.CommonName; cn != d.ID && (d.CertificateCN == "" || cn != d.CertificateCN) {
			return fmt.Errorf("certificate CN %q is not the device id %q", leaf.Subject.CommonName, d.ID)
		}
		inter := x509.NewCertPool()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: inter,
			CurrentTime:   now,
			// The hub does not police extended key usage.
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		})
		if err != nil {
			return fmt.Errorf("certificate chain does not verify to the issuing CA or a verified registered CA: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("device authenticates with %q, not X.509", d.Auth)
	}
}

// verifyInHandshake is the hub's tls.Config.VerifyPeerCertificate: an
// error makes crypto/tls send a bad_certificate alert and end the handshake.
// No certificate (SAS devices) is left to CONNECT.
func (h *Hub) verifyInHandshake(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return nil
	}
	chain := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return fmt.Errorf("client certificate does not parse: %w", err)
		}
		chain = append(chain, c)
	}
	leaf := chain[0]
	if h.cfg.Faults != nil && h.cfg.Faults.CertificateRejected(leaf.SerialNumber.Text(16)) {
		return errors.New("client certificate refused (fault injected)")
	}
	if !h.cfg.RejectInHandshake {
		return nil
	}
	now := h.now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return errors.New("client certificate is not valid now")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	s256 := sha256.Sum256(leaf.Raw)
	s1 := sha1.Sum(leaf.Raw)
	h.mu.Lock()
	roots := h.trustedRootsLocked()
	known := false
	for _, d := range h.devices {
		for _, t := range d.Thumbprints {
			if t == hex.EncodeToString(s256[:]) || t == hex.EncodeToString(s1[:]) {
				known = true
			}
		}
	}
	h.mu.Unlock()
	if known {
		return nil
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("client certificate chains to no CA the hub trusts: %w", err)
	}
	return nil
}

// trustedRootsLocked is the pool device chains must reach: the issuer's CAs
// and every registered CA whose proof of possession was verified.
func (h *Hub) trustedRootsLocked() *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range h.cfg.Issuer.IssuingCAs() {
		p.AddCert(c)
	}
	for _, ca := range h.cas {
		if ca.Verified && ca.cert != nil {
			p.AddCert(ca.cert)
		}
	}
	return p
}
