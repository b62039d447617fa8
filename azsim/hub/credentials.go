package hub

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/gwagent/gwagent/azsim/faults"
)

const (
	maxCSRLength = 8 * 1024
	// operationTTL is how long a renewal answer waits for its device.
	operationTTL = time.Hour
	// minCredentialsAPIVersion is the first hub api-version with the
	// $iothub/credentials API (the SDKs that implement it pin this one).
	minCredentialsAPIVersion = "2025-08-01-preview"
)

// renewalOp is a certificate request accepted with 202.
type renewalOp struct {
	rid           string
	correlationID string
	expires       time.Time
	chain         [][]byte // set once issued, leaf first
}

// validRID: 4-36 ASCII letters, digits and '-', not starting or ending
// with '-'.
func validRID(s string) bool {
	if len(s) < 4 || len(s) > 36 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// apiVersionAtLeast compares Azure api-versions (YYYY-MM-DD[-preview]) by
// date; a preview sorts before the release of the same date.
func apiVersionAtLeast(v, min string) bool {
	if len(v) < 10 || len(min) < 10 {
		return false
	}
	if v[:10] != min[:10] {
		return v[:10] > min[:10]
	}
	return strings.HasSuffix(min, "-preview") || !strings.HasSuffix(v, "-preview")
}

func fmtExpires(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z") }

// credError is an error answer of the credentials API.
type credError struct {
	status     int
	code       int
	msg        string
	retryAfter int
	info       map[string]any
}

func (h *Hub) credReply(cl *mqtt.Client, status int, rid string, body []byte) error {
	// azure-sdk-for-c notes the hub publishes these at QoS 0.
	return h.send(cl, "$iothub/credentials/res/"+strconv.Itoa(status)+"/?$rid="+bagEscape(rid), body, 0)
}

func (h *Hub) credFail(cl *mqtt.Client, rid string, e credError) {
	body := map[string]any{}
	_ = json.Unmarshal(h.errorBody(e.code, e.msg, e.retryAfter), &body)
	if e.info == nil {
		e.info = map[string]any{}
	}
	if _, ok := e.info["requestId"]; !ok {
		e.info["requestId"] = rid
	}
	body["info"] = e.info
	b, _ := json.Marshal(body)
	_ = h.credReply(cl, e.status, rid, b)
}

type issueRequest struct {
	ID      *string `json:"id"`
	CSR     *string `json:"csr"`
	Replace *string `json:"replace"`
}

// issueCertificate serves $iothub/credentials/POST/issueCertificate/?$rid=.
func (h *Hub) issueCertificate(cl *mqtt.Client, t deviceTopic, payload []byte) {
	// No $rid or no subscription: the hub does not answer at all.
	if !t.hasRID {
		return
	}
	if ok, _ := subscribed(cl, subCredentials); !ok {
		return
	}
	rid := t.rid
	if !validRID(rid) {
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: "$rid must be 4 to 36 ASCII letters, digits or '-', not starting or ending with '-'"})
		return
	}
	h.mu.Lock()
	c := h.conns[cl]
	h.mu.Unlock()
	if c == nil {
		return
	}
	if !apiVersionAtLeast(c.apiVersion, minCredentialsAPIVersion) {
		h.credFail(cl, rid, credError{status: 400, code: 400001, msg: fmt.Sprintf("the credentials API needs api-version=%s or later in the CONNECT username; this connection used %s", minCredentialsAPIVersion, c.apiVersion)})
		return
	}
	if h.cfg.Faults != nil && h.cfg.Faults.CredentialsMode() == faults.CredentialsSilent {
		return // PUBACK went out; no 202, no answer ever
	}
	if h.cfg.Faults != nil {
		if a, ok := h.cfg.Faults.Take(faults.Hub); ok {
			h.credFail(cl, rid, credError{status: a.Status, code: credFaultCode(a.Status), msg: http.StatusText(a.Status) + " (fault injected by azsim)", retryAfter: a.RetryAfter})
			return
		}
	}
	if !json.Valid(payload) {
		h.credFail(cl, rid, credError{status: 400, code: 400006, msg: "request body is not valid JSON"})
		return
	}
	var req issueRequest
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: "request body must be {\"id\",\"csr\",\"replace\"?}: " + err.Error()})
		return
	}
	switch {
	case req.ID == nil || *req.ID == "":
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: "id is missing; set it to the device id"})
		return
	case *req.ID != cl.ID:
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: fmt.Sprintf("id %q is not the authenticated device %q", *req.ID, cl.ID)})
		return
	case req.CSR == nil || *req.CSR == "":
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: "csr is missing"})
		return
	case len(*req.CSR) > maxCSRLength:
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: fmt.Sprintf("csr is %d characters; the limit is 8 KiB", len(*req.CSR))})
		return
	case req.Replace != nil && *req.Replace != "*" && !validRID(*req.Replace):
		h.credFail(cl, rid, credError{status: 400, code: 400004, msg: "replace must be \"*\" or the $rid of the request to replace"})
		return
	}
	csr, cerr := parseRenewalCSR(*req.CSR, cl.ID)
	if cerr != nil {
		h.credFail(cl, rid, *cerr)
		return
	}

	now := h.now()
	h.mu.Lock()
	d, ok := h.devices[cl.ID]
	if !ok {
		h.mu.Unlock()
		h.credFail(cl, rid, credError{status: 404, code: 404001, msg: "device not found"})
		return
	}
	if op := d.renewal; op != nil && !now.Before(op.expires) {
		d.renewal = nil
	}
	if op := d.renewal; op != nil {
		// info names the active request, so the device can replace it.
		info := map[string]any{"requestId": op.rid, "correlationId": op.correlationID, "operationExpires": fmtExpires(op.expires)}
		switch {
		case req.Replace == nil:
			h.mu.Unlock()
			h.credFail(cl, rid, credError{status: 409, code: 409005, msg: fmt.Sprintf("a certificate request (%s) is already active; wait for it or send \"replace\"", op.rid), info: info})
			return
		case *req.Replace != "*" && *req.Replace != op.rid:
			h.mu.Unlock()
			h.credFail(cl, rid, credError{status: 412, code: 412005, msg: fmt.Sprintf("replace %q names no active request; the active one is %s", *req.Replace, op.rid), info: info})
			return
		}
		d.renewal = nil // replaced: its answer is never sent
	} else if req.Replace != nil && *req.Replace != "*" {
		h.mu.Unlock()
		h.credFail(cl, rid, credError{status: 412, code: 412005, msg: fmt.Sprintf("replace %q names no active request", *req.Replace)})
		return
	}
	// The answer waits an hour beyond the issuance delay, which may be
	// hours, as real issuance can be.
	op := &renewalOp{rid: rid, correlationID: newUUID(), expires: now.Add(h.issueDelay + operationTTL)}
	d.renewal = op
	h.goLocked(func() { h.runRenewal(cl.ID, op, csr) })
	h.mu.Unlock()

	body, _ := json.Marshal(map[string]string{"correlationId": op.correlationID, "operationExpires": fmtExpires(op.expires)})
	_ = h.credReply(cl, 202, rid, body)
}

func credFaultCode(status int) int {
	switch status {
	case 429:
		return 429002
	case 500:
		return 500001
	case 503:
		return 503001
	}
	return status*1000 + 1
}

// parseRenewalCSR checks the csr field: base64 DER (no PEM, no line
// breaks) of a signed PKCS#10 request for an EC key, CN = device id.
func parseRenewalCSR(s, deviceID string) (*x509.CertificateRequest, *credError) {
	bad := func(kind, msg string) *credError {
		return &credError{status: 400, code: 400040, msg: "certificate signing request rejected: " + msg,
			info: map[string]any{"credentialError": kind, "credentialMessage": msg}}
	}
	if strings.Contains(s, "-----BEGIN") {
		return nil, bad("FailedToDecodeCsr", "csr is PEM; send the base64 of the DER bytes without header, footer or line breaks")
	}
	if strings.ContainsAny(s, "\r\n\t ") {
		return nil, bad("FailedToDecodeCsr", "csr contains whitespace or line breaks; send one line of base64")
	}
	der, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, bad("FailedToDecodeCsr", "csr is not standard base64")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, bad("FailedToDecodeCsr", "csr is not a DER PKCS#10 request: "+err.Error())
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, bad("InvalidCsr", "csr signature does not verify: "+err.Error())
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		// P-384 is what Azure documents; P-256 is what its SDK samples and
		// live tests send, so both are accepted.
		if k.Curve != elliptic.P384() && k.Curve != elliptic.P256() {
			return nil, bad("InvalidCsr", "csr key is EC "+k.Curve.Params().Name+"; use NIST P-384")
		}
	case *rsa.PublicKey:
		return nil, bad("InvalidCsr", "csr key is RSA, which certificate management does not support; use EC NIST P-384")
	default:
		return nil, bad("InvalidCsr", fmt.Sprintf("csr key type %T is not supported; use EC NIST P-384", k))
	}
	if csr.Subject.CommonName != deviceID {
		return nil, bad("InvalidCsr", fmt.Sprintf("csr subject CN %q must be the device id %q", csr.Subject.CommonName, deviceID))
	}
	return csr, nil
}

// runRenewal issues the certificate after the configured delay and hands
// the answer to the device when it can take it.
func (h *Hub) runRenewal(id string, op *renewalOp, csr *x509.CertificateRequest) {
	if h.issueDelay > 0 {
		t := time.NewTimer(h.issueDelay)
		select {
		case <-t.C:
		case <-h.ctx.Done():
			t.Stop()
			return
		}
	}
	chain, err := h.cfg.Issuer.Issue(csr, id, h.cfg.CertLifetime)
	if err == nil && len(chain) == 0 {
		err = fmt.Errorf("issuer returned no certificate")
	}
	h.mu.Lock()
	d, ok := h.devices[id]
	if !ok || d.renewal != op {
		h.mu.Unlock()
		return // device deleted or request replaced
	}
	if err != nil {
		d.renewal = nil
		cl, _ := h.liveClientLocked(id)
		h.mu.Unlock()
		if cl != nil {
			h.credFail(cl, op.rid, credError{status: 500, code: 500001, msg: "azsim's issuing CA failed: " + err.Error(),
				info: map[string]any{"correlationId": op.correlationID, "credentialError": "IssuanceFailed"}})
		}
		return
	}
	for _, c := range chain {
		op.chain = append(op.chain, c.Raw)
	}
	d.setCertificateLocked(chain[0].Raw, "renewal", h.now())
	h.mu.Unlock()
	_ = h.persist()
	h.deliverRenewal(id)
}

// deliverRenewal sends a finished renewal's 200 if the device is connected
// and subscribed before operationExpires; otherwise it keeps waiting (or is
// dropped once expired).
func (h *Hub) deliverRenewal(id string) {
	h.mu.Lock()
	d, ok := h.devices[id]
	if !ok || d.renewal == nil || d.renewal.chain == nil {
		h.mu.Unlock()
		return
	}
	op := d.renewal
	if !h.now().Before(op.expires) {
		d.renewal = nil
		h.mu.Unlock()
		return
	}
	cl, _ := h.liveClientLocked(id)
	if cl == nil {
		h.mu.Unlock()
		return
	}
	if ok, _ := subscribed(cl, subCredentials); !ok {
		h.mu.Unlock()
		return
	}
	d.renewal = nil
	h.mu.Unlock()
	if h.cfg.Faults != nil && h.cfg.Faults.TakeAnswerLoss() {
		// The answer went out at QoS 0 and the connection dropped before
		// the device read it: as far as the hub knows it was sent, so it
		// is never sent again (the hardest reading of what Azure
		// documents; docs/azure-fidelity.md).
		h.noteDisconnect(id, 0, "certificate answer lost in a connection drop (fault injected)")
		cl.Stop(errDropped)
		return
	}

	certs := make([]string, len(op.chain))
	for i, der := range op.chain {
		certs[i] = base64.StdEncoding.EncodeToString(der)
	}
	body, _ := json.Marshal(map[string]any{"certificates": certs, "correlationId": op.correlationID})
	if err := h.credReply(cl, 200, op.rid, body); err != nil {
		h.mu.Lock()
		if d.renewal == nil {
			d.renewal = op // the connection died under us: keep it for the next one
		}
		h.mu.Unlock()
	}
}
