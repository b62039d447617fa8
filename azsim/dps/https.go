package dps

// DPS's REST endpoint (Learn: "Send an HTTPS request to DPS with symmetric
// keys" and "... with X.509"): the same registrations as over
// MQTT, for X.509 (client certificate in the TLS handshake), symmetric
// keys and TPM attestation (SAS token in the Authorization header).
//
//	PUT /{idScope}/registrations/{registrationId}/register?api-version=V
//	GET /{idScope}/registrations/{registrationId}/operations/{operationId}?api-version=V

import (
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim/faults"
)

type httpsServer struct {
	srv *http.Server
	ln  net.Listener
}

// StartHTTPS serves the REST endpoint on addr with the same server
// certificate and TLS rules as the MQTT endpoint.
func (d *DPS) StartHTTPS(addr string) error {
	nl, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("dps start https: listen on %s: %w (is the port in use? pick another with --dps-https-addr)", addr, err)
	}
	tc := d.cfg.TLS.Clone()
	tc.ClientAuth = tls.RequestClientCert
	tc.VerifyPeerCertificate = d.verifyInHandshake
	tc.MinVersion = max(tc.MinVersion, tls.VersionTLS12)
	if tc.MaxVersion == 0 {
		tc.MaxVersion = tls.VersionTLS12 // as Azure DPS, and as the MQTT endpoint
	}
	tc.NextProtos = []string{"http/1.1"}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /{scope}/registrations/{regID}/register", d.httpRegister)
	mux.HandleFunc("GET /{scope}/registrations/{regID}/operations/{opID}", d.httpPoll)
	// Everything else answers in DPS's error format, not net/http's text.
	mux.HandleFunc("/{scope}/registrations/{regID}/register", methodNotAllowed("PUT"))
	mux.HandleFunc("/{scope}/registrations/{regID}/operations/{opID}", methodNotAllowed("GET"))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeDPS(w, 404, 0, errorBody(404001, "no such resource; DPS serves PUT /{idScope}/registrations/{registrationId}/register and GET .../operations/{operationId}"))
	})
	// Every connection is bounded in time: a client that dribbles its
	// headers or body, does not read its answers, or holds an idle
	// connection is cut off, so hostile or broken clients cannot pile up
	// goroutines and buffers.
	timeout := d.cfg.HTTPTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	srv := &http.Server{Handler: mux, TLSConfig: tc, ReadHeaderTimeout: min(timeout, 10*time.Second),
		ReadTimeout: timeout, WriteTimeout: 2 * timeout, IdleTimeout: 3 * timeout,
		ErrorLog: log.New(io.Discard, "", 0), MaxHeaderBytes: 16 << 10}
	go srv.ServeTLS(nl, "", "")
	d.tpm.mu.Lock()
	d.tpm.web = &httpsServer{srv: srv, ln: nl}
	d.tpm.mu.Unlock()
	return nil
}

// HTTPSAddr is the REST endpoint's bound address, or nil.
func (d *DPS) HTTPSAddr() net.Addr {
	d.tpm.mu.Lock()
	defer d.tpm.mu.Unlock()
	if d.tpm.web == nil {
		return nil
	}
	return d.tpm.web.ln.Addr()
}

func (d *DPS) closeHTTPS() error {
	d.tpm.mu.Lock()
	w := d.tpm.web
	d.tpm.web = nil
	d.tpm.mu.Unlock()
	if w == nil {
		return nil
	}
	return w.srv.Close()
}

func writeDPS(w http.ResponseWriter, status, retryAfter int, body []byte) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	}
	w.WriteHeader(status)
	w.Write(body)
}

// maxBody is DPS's message limit (Learn: "Azure IoT Hub DPS limits", 96 KB).
const maxBody = 96 << 10

// readBody reads a registration body of at most maxBody bytes, answering
// 415 for a body that says it is not JSON and 413 for one over the limit
// (announced or actual) rather than parsing a truncated prefix.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			writeDPS(w, 415, 0, errorBody(415001, fmt.Sprintf("Content-Type %q is not supported; send application/json", ct)))
			return nil, false
		}
	}
	if r.ContentLength > maxBody {
		writeDPS(w, 413, 0, errorBody(413001, fmt.Sprintf("the request body of %d bytes exceeds DPS's limit of %d", r.ContentLength, maxBody)))
		return nil, false
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
		writeDPS(w, 413, 0, errorBody(413001, fmt.Sprintf("the request body exceeds DPS's limit of %d bytes", maxBody)))
		return nil, false
	}
	if err != nil {
		writeDPS(w, 400, 0, errorBody(400004, "reading the request body: "+err.Error()))
		return nil, false
	}
	return raw, true
}

// methodNotAllowed answers a known path asked with the wrong method.
func methodNotAllowed(allow string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeDPS(w, 405, 0, errorBody(405001, r.Method+" is not allowed here; use "+allow))
	}
}

// httpSession checks scope and api-version and collects the credential.
func (d *DPS) httpSession(w http.ResponseWriter, r *http.Request) (*session, bool) {
	if !strings.EqualFold(r.PathValue("scope"), d.cfg.IDScope) {
		writeDPS(w, 401, 0, errorBody(401002, "unknown id scope "+r.PathValue("scope")))
		return nil, false
	}
	api := r.URL.Query().Get("api-version")
	if err := checkAPIVersion(api); err != nil {
		writeDPS(w, 400, 0, errorBody(400001, err.Error()))
		return nil, false
	}
	if err := checkRegistrationID(r.PathValue("regID")); err != nil {
		writeDPS(w, 400, 0, errorBody(400004, err.Error()))
		return nil, false
	}
	s := &session{regID: r.PathValue("regID"), apiVersion: api, password: r.Header.Get("Authorization")}
	if r.TLS != nil {
		s.chain = r.TLS.PeerCertificates
	}
	if a, ok := d.cfg.Faults.Take(faults.DPS); ok {
		writeDPS(w, a.Status, a.RetryAfter, errorBody(a.Status*1000+1, "injected fault"))
		return nil, false
	}
	return s, true
}

func (d *DPS) httpRegister(w http.ResponseWriter, r *http.Request) {
	s, ok := d.httpSession(w, r)
	if !ok {
		return
	}
	reply := func(status, retryAfter int, body []byte) { writeDPS(w, status, retryAfter, body) }
	raw, ok := readBody(w, r)
	if !ok {
		return
	}
	body, ok := decodeRegister(raw, s.regID, "path", reply)
	if !ok {
		return
	}
	var group *Enrollment
	var sym bool
	var tpm *tpmChallengeKey
	var err error
	if body.TPM != nil {
		var e *TPMEnrollment
		var status int
		var errBody []byte
		e, tpm, status, errBody = d.tpmAttest(s.regID, body.TPM.EndorsementKey, body.TPM.StorageRootKey, s.password)
		if e == nil {
			reply(status, 0, errBody)
			return
		}
		group = &Enrollment{ID: e.RegistrationID, Kind: KindTPM, Enabled: e.Enabled}
	} else {
		group, sym, err = d.authenticate(s)
		if err != nil {
			reply(401, 0, errorBody(401002, err.Error()))
			return
		}
	}
	d.startOperation(s, group, sym, tpm, body.CSR, reply)
}

func (d *DPS) httpPoll(w http.ResponseWriter, r *http.Request) {
	s, ok := d.httpSession(w, r)
	if !ok {
		return
	}
	reply := func(status, retryAfter int, body []byte) { writeDPS(w, status, retryAfter, body) }
	opID := r.PathValue("opID")
	op, ok := d.lookup(s.regID, opID, reply)
	if !ok {
		return
	}
	// Every REST request authenticates on its own; a TPM registration's
	// polls with the key of the challenge it answered.
	var authErr error
	if op.tpm != nil {
		if s.password == "" {
			authErr = errors.New("a TPM registration's status needs the SAS token")
		} else {
			authErr = d.checkTPMToken(s.password, s.regID, op.tpm.key)
		}
	} else {
		_, _, authErr = d.authenticate(s)
	}
	if authErr != nil {
		reply(401, 0, errorBody(401002, authErr.Error()))
		return
	}
	var decorate func(*operation)
	if op.tpm != nil {
		decorate = func(op *operation) { op.result = tpmResult(op.result, op.tpm.blob) }
	}
	d.pollOperation(op, "Retry-After", reply, decorate)
}

// tpmResult names the attestation in the registration state as DPS does
// for TPM enrollments: "tpm" with the authenticationKey (the challenge,
// which the Azure SDKs import again to keep the key for the hub) instead
// of the group's "x509".
func tpmResult(result, blob []byte) []byte {
	var m map[string]any
	if json.Unmarshal(result, &m) != nil {
		return result
	}
	if st, ok := m["registrationState"].(map[string]any); ok {
		delete(st, "x509")
		delete(st, "symmetricKey")
		st["tpm"] = map[string]any{"authenticationKey": base64.StdEncoding.EncodeToString(blob)}
	}
	return mustJSON(m)
}
