package dps

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// KindTPM marks operations of TPM-attested individual enrollments.
const KindTPM = "tpm"

// TPMEnrollment is an individual enrollment with TPM attestation: the
// registration id and the endorsement key a manufacturer recorded.
type TPMEnrollment struct {
	RegistrationID string `json:"registrationId"`
	// EndorsementKey is the base64 TPM2B_PUBLIC of the device's EK.
	EndorsementKey string `json:"endorsementKey"`
	Enabled        bool   `json:"enabled"`

	ek []byte
}

// tpmState holds TPM enrollments (persisted in dps-tpm.json) and the HMAC
// keys of the challenges handed out (memory only, like a pending
// challenge), plus the HTTPS endpoint.
type tpmState struct {
	dir string

	mu      sync.Mutex
	enroll  map[string]*TPMEnrollment   // by lower-case registration id
	pending map[string]*tpmChallengeKey // the last challenge by lower-case registration id
	tamper  func([]byte) []byte
	saveMu  sync.Mutex // one save at a time, so the newest state is the one on disk

	web *httpsServer
}

func newTPMState(dir string) (*tpmState, error) {
	t := &tpmState{dir: dir, enroll: map[string]*TPMEnrollment{}, pending: map[string]*tpmChallengeKey{}}
	if dir == "" {
		return t, nil
	}
	b, err := os.ReadFile(t.path())
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("dps: %w", err)
	}
	var list []*TPMEnrollment
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("dps: %s is damaged: %w; delete it to start over", t.path(), err)
	}
	for _, e := range list {
		if e.ek, err = checkEK(e.EndorsementKey); err != nil {
			return nil, fmt.Errorf("dps: %s: enrollment %s: %w", t.path(), e.RegistrationID, err)
		}
		t.enroll[strings.ToLower(e.RegistrationID)] = e
	}
	return t, nil
}

func (t *tpmState) path() string { return filepath.Join(t.dir, "dps-tpm.json") }

func (t *tpmState) save() error {
	if t.dir == "" {
		return nil
	}
	t.saveMu.Lock()
	defer t.saveMu.Unlock()
	t.mu.Lock()
	list := make([]*TPMEnrollment, 0, len(t.enroll))
	for _, e := range t.enroll {
		list = append(list, e)
	}
	t.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].RegistrationID < list[j].RegistrationID })
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(t.path(), b, 0o600)
}

// checkEK decodes and checks an endorsement key as DPS does at enrollment.
func checkEK(b64 string) ([]byte, error) {
	ek, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		return nil, errors.New("endorsementKey is not base64")
	}
	if _, err := parseRSAPublic(ek); err != nil {
		return nil, fmt.Errorf("endorsementKey is not an RSA 2048 TPM endorsement key (base64 TPM2B_PUBLIC): %v", err)
	}
	return ek, nil
}

// PutTPMEnrollment creates or replaces an individual TPM enrollment.
func (d *DPS) PutTPMEnrollment(e TPMEnrollment) error {
	if err := checkRegistrationID(e.RegistrationID); err != nil {
		return fmt.Errorf("TPM enrollment: %w", err)
	}
	ek, err := checkEK(e.EndorsementKey)
	if err != nil {
		return fmt.Errorf("enrollment %s: %w", e.RegistrationID, err)
	}
	e.ek, e.EndorsementKey = ek, base64.StdEncoding.EncodeToString(ek)
	t := d.tpm
	t.mu.Lock()
	t.enroll[strings.ToLower(e.RegistrationID)] = &e
	delete(t.pending, strings.ToLower(e.RegistrationID))
	t.mu.Unlock()
	return t.save()
}

// TPMEnrollments lists the TPM enrollments.
func (d *DPS) TPMEnrollments() []TPMEnrollment {
	t := d.tpm
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]TPMEnrollment, 0, len(t.enroll))
	for _, e := range t.enroll {
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RegistrationID < out[j].RegistrationID })
	return out
}

// SetTPMEnabled enables or disables a TPM enrollment.
func (d *DPS) SetTPMEnabled(regID string, on bool) error {
	t := d.tpm
	t.mu.Lock()
	e, ok := t.enroll[strings.ToLower(regID)]
	if ok {
		e.Enabled = on
	}
	t.mu.Unlock()
	if !ok {
		return fmt.Errorf("no TPM enrollment %q", regID)
	}
	return t.save()
}

// TamperTPMChallenge makes DPS pass every challenge through f before
// sending it (tests of a damaged or misdirected challenge); nil undoes it.
func (d *DPS) TamperTPMChallenge(f func([]byte) []byte) {
	d.tpm.mu.Lock()
	d.tpm.tamper = f
	d.tpm.mu.Unlock()
}

// tpmChallengeKey is a challenge handed to a TPM (the authenticationKey)
// and the HMAC key it carries.
type tpmChallengeKey struct {
	blob, key []byte
}

// tpmAttest is the TPM half of a registration request. Without a SAS
// token it answers with a challenge (401 + authenticationKey); with one it
// checks the token against the key of the last challenge and returns the
// enrollment and that challenge.
func (d *DPS) tpmAttest(regID string, ekB64, srkB64, auth string) (*TPMEnrollment, *tpmChallengeKey, int, []byte) {
	t := d.tpm
	key := strings.ToLower(regID)
	t.mu.Lock()
	e, ok := t.enroll[key]
	var enr TPMEnrollment
	if ok {
		enr = *e
	}
	ch, tamper := t.pending[key], t.tamper
	t.mu.Unlock()
	if !ok {
		return nil, nil, 401, errorBody(401002, "no TPM enrollment for registration id "+regID)
	}
	ek, err := base64.StdEncoding.DecodeString(ekB64)
	if err != nil || !bytes.Equal(ek, enr.ek) {
		return nil, nil, 401, errorBody(401002, "the endorsement key does not match the enrollment of "+regID)
	}
	if auth == "" {
		srkRaw, err := base64.StdEncoding.DecodeString(srkB64)
		if err != nil {
			return nil, nil, 400, errorBody(400004, "storageRootKey is not base64")
		}
		srk, err := parseRSAPublic(srkRaw)
		if err != nil {
			return nil, nil, 400, errorBody(400004, "storageRootKey: "+err.Error())
		}
		ekKey, err := parseRSAPublic(enr.ek)
		if err != nil {
			return nil, nil, 500, errorBody(500000, err.Error())
		}
		blob, hmacKey, err := tpmChallenge(ekKey, srk)
		if err != nil {
			return nil, nil, 500, errorBody(500000, err.Error())
		}
		t.mu.Lock()
		t.pending[key] = &tpmChallengeKey{blob: blob, key: hmacKey}
		t.mu.Unlock()
		if tamper != nil {
			blob = tamper(blob)
		}
		return nil, nil, 401, mustJSON(map[string]string{"authenticationKey": base64.StdEncoding.EncodeToString(blob)})
	}
	if ch == nil {
		return nil, nil, 401, errorBody(401002, "no challenge was issued to "+regID+"; register without a SAS token first")
	}
	if err := d.checkTPMToken(auth, regID, ch.key); err != nil {
		return nil, nil, 401, errorBody(401002, err.Error())
	}
	return &enr, ch, 0, nil
}

// checkTPMToken verifies a SAS token signed with a challenge's HMAC key.
func (d *DPS) checkTPMToken(token, regID string, hmacKey []byte) error {
	sr, rawSR, sig, se, err := parseSAS(token)
	if err != nil {
		return err
	}
	want := d.cfg.IDScope + "/registrations/" + regID
	if !strings.EqualFold(sr, want) {
		return fmt.Errorf("SAS token resource %q is not %s", sr, want)
	}
	if d.now().Unix() >= se {
		return errors.New("SAS token expired")
	}
	got, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		return errors.New("SAS signature is not base64")
	}
	for _, s := range []string{rawSR, url.QueryEscape(sr)} {
		m := hmac.New(sha256.New, hmacKey)
		fmt.Fprintf(m, "%s\n%d", s, se)
		if hmac.Equal(m.Sum(nil), got) {
			return nil
		}
	}
	return errors.New("the SAS token is not signed with the key of the TPM challenge")
}

// tpmAdmin adds the TPM enrollment admin API:
//
//	GET  /dps/tpm-enrollments                      list
//	PUT  /dps/tpm-enrollments/{registrationId}     {"endorsementKey":B64}; "enabled" defaults to true
//	POST /dps/tpm-enrollments/{registrationId}/enable|disable
func (d *DPS) tpmAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /dps/tpm-enrollments", func(w http.ResponseWriter, r *http.Request) {
		broker.WriteJSON(w, 200, d.TPMEnrollments())
	})
	mux.HandleFunc("PUT /dps/tpm-enrollments/{id}", func(w http.ResponseWriter, r *http.Request) {
		var e struct {
			TPMEnrollment
			Enabled *bool `json:"enabled"`
		}
		b, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		if err := json.Unmarshal(b, &e); err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": "body is not JSON: " + err.Error()})
			return
		}
		e.TPMEnrollment.RegistrationID = r.PathValue("id")
		e.TPMEnrollment.Enabled = e.Enabled == nil || *e.Enabled
		if err := d.PutTPMEnrollment(e.TPMEnrollment); err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		broker.WriteJSON(w, 200, e.TPMEnrollment)
	})
	for _, action := range []string{"enable", "disable"} {
		mux.HandleFunc("POST /dps/tpm-enrollments/{id}/"+action, func(w http.ResponseWriter, r *http.Request) {
			if err := d.SetTPMEnabled(r.PathValue("id"), action == "enable"); err != nil {
				broker.WriteJSON(w, 404, map[string]string{"error": err.Error()})
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
	}
}
