package hub

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"sort"
	"strings"
	"time"
)

// caRecord is a CA certificate registered at the hub, trusted for device
// authentication once its proof of possession is verified.
type caRecord struct {
	Name             string     `json:"name"`
	DER              []byte     `json:"der"`
	VerificationCode string     `json:"verificationCode"`
	Verified         bool       `json:"verified"`
	CreatedAt        time.Time  `json:"createdAt"`
	VerifiedAt       *time.Time `json:"verifiedAt,omitempty"`

	cert *x509.Certificate
}

func (c *caRecord) parse() error {
	cert, err := x509.ParseCertificate(c.DER)
	if err != nil {
		return err
	}
	c.cert = cert
	return nil
}

// CAView is a registered CA as the admin API shows it.
type CAView struct {
	Name             string    `json:"name"`
	Subject          string    `json:"subject"`
	SHA256           string    `json:"sha256"`
	NotBefore        time.Time `json:"notBefore"`
	NotAfter         time.Time `json:"notAfter"`
	Verified         bool      `json:"verified"`
	VerificationCode string    `json:"verificationCode"`
}

func (c *caRecord) view() CAView {
	sum := sha256.Sum256(c.DER)
	return CAView{
		Name:             c.Name,
		Subject:          c.cert.Subject.String(),
		SHA256:           hex.EncodeToString(sum[:]),
		NotBefore:        c.cert.NotBefore.UTC(),
		NotAfter:         c.cert.NotAfter.UTC(),
		Verified:         c.Verified,
		VerificationCode: c.VerificationCode,
	}
}

func validCAName(name string) error {
	if name == "" || len(name) > 64 {
		return errorf(http.StatusBadRequest, "CA name %q must be 1 to 64 characters", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return errorf(http.StatusBadRequest, "CA name %q may only use letters, digits, '-', '_' and '.'", name)
		}
	}
	return nil
}

// parsePEMCert reads the first CERTIFICATE block of a PEM document.
func parsePEMCert(b []byte, what string) (*x509.Certificate, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errorf(http.StatusBadRequest, "%s: body has no PEM CERTIFICATE block; send the certificate as PEM", what)
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, errorf(http.StatusBadRequest, "%s: certificate does not parse: %v", what, err)
		}
		return c, nil
	}
}

// uploadCA registers (or replaces) a CA; it stays untrusted until verified.
func (h *Hub) uploadCA(name string, body []byte) (CAView, error) {
	if err := validCAName(name); err != nil {
		return CAView{}, err
	}
	c, err := parsePEMCert(body, "upload CA "+name)
	if err != nil {
		return CAView{}, err
	}
	if !c.BasicConstraintsValid || !c.IsCA {
		return CAView{}, errorf(http.StatusBadRequest, "upload CA %s: %q is not a CA certificate (basicConstraints CA:TRUE); upload the root or intermediate that signs your devices", name, c.Subject.String())
	}
	var code [24]byte
	_, _ = rand.Read(code[:])
	rec := &caRecord{
		Name:             name,
		DER:              c.Raw,
		VerificationCode: strings.ToUpper(hex.EncodeToString(code[:])),
		CreatedAt:        h.now().UTC(),
		cert:             c,
	}
	h.mu.Lock()
	h.cas[name] = rec
	v := rec.view()
	h.mu.Unlock()
	if err := h.persist(); err != nil {
		return CAView{}, err
	}
	return v, nil
}

// verifyCA checks the proof of possession: a certificate whose CN is the
// verification code, signed by the CA's key.
func (h *Hub) verifyCA(name string, body []byte) (CAView, error) {
	proof, err := parsePEMCert(body, "verify CA "+name)
	if err != nil {
		return CAView{}, err
	}
	now := h.now()
	h.mu.Lock()
	rec, ok := h.cas[name]
	if !ok {
		h.mu.Unlock()
		return CAView{}, errorf(http.StatusNotFound, "CA %q is not registered; upload it first with POST /hub/cas/%s", name, name)
	}
	if proof.Subject.CommonName != rec.VerificationCode {
		h.mu.Unlock()
		return CAView{}, errorf(http.StatusBadRequest, "verify CA %s: certificate CN %q is not the verification code %s; sign a certificate with CN=%s using the CA's key", name, proof.Subject.CommonName, rec.VerificationCode, rec.VerificationCode)
	}
	if err := proof.CheckSignatureFrom(rec.cert); err != nil {
		h.mu.Unlock()
		return CAView{}, errorf(http.StatusBadRequest, "verify CA %s: the verification certificate is not signed by this CA's key (%v); sign it with the key of %q", name, err, rec.cert.Subject.String())
	}
	if now.Before(proof.NotBefore) || now.After(proof.NotAfter) {
		h.mu.Unlock()
		return CAView{}, errorf(http.StatusBadRequest, "verify CA %s: the verification certificate is not valid now", name)
	}
	rec.Verified = true
	t := now.UTC()
	rec.VerifiedAt = &t
	v := rec.view()
	h.mu.Unlock()
	if err := h.persist(); err != nil {
		return CAView{}, err
	}
	return v, nil
}

func (h *Hub) listCAs() []CAView {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]CAView, 0, len(h.cas))
	for _, c := range h.cas {
		out = append(out, c.view())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (h *Hub) deleteCA(name string) error {
	h.mu.Lock()
	_, ok := h.cas[name]
	delete(h.cas, name)
	h.mu.Unlock()
	if !ok {
		return errorf(http.StatusNotFound, "CA %q is not registered", name)
	}
	return h.persist()
}

// TrustCA registers cert as a verified CA, as an operator does after the
// proof of possession; azsim uses it for its own onboarding root, so devices
// provisioned by X.509 without a CSR can use their onboarding certificate at
// the hub, like a hub linked to the same CA.
func (h *Hub) TrustCA(name string, cert *x509.Certificate) error {
	if err := validCAName(name); err != nil {
		return err
	}
	now := h.now().UTC()
	h.mu.Lock()
	if rec, ok := h.cas[name]; ok && rec.Verified && rec.cert.Equal(cert) {
		h.mu.Unlock()
		return nil
	}
	h.cas[name] = &caRecord{Name: name, DER: cert.Raw, VerificationCode: "(trusted by azsim)", Verified: true,
		CreatedAt: now, VerifiedAt: &now, cert: cert}
	h.mu.Unlock()
	return h.persist()
}
