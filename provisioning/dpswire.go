package provisioning

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// DPS MQTT topics (azure-protocol §1.4).
const (
	dpsSubscribe     = "$dps/registrations/res/#"
	dpsRegisterTopic = "$dps/registrations/PUT/iotdps-register/?$rid="
	dpsPollTopic     = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="
	dpsResPrefix     = "$dps/registrations/res/"
)

// Registration statuses (RegistrationOperationStatus.status).
const (
	StatusUnassigned = "unassigned"
	StatusAssigning  = "assigning"
	StatusAssigned   = "assigned"
	StatusFailed     = "failed"
	StatusDisabled   = "disabled"
)

// Operation is DPS's RegistrationOperationStatus.
type Operation struct {
	OperationID       string             `json:"operationId"`
	Status            string             `json:"status"`
	RegistrationState *RegistrationState `json:"registrationState,omitempty"`
}

// RegistrationState is DPS's DeviceRegistrationResult, the fields gwagent uses.
type RegistrationState struct {
	RegistrationID         string          `json:"registrationId"`
	AssignedHub            string          `json:"assignedHub"`
	DeviceID               string          `json:"deviceId"`
	Status                 string          `json:"status"`
	Substatus              string          `json:"substatus"`
	ErrorCode              int64           `json:"errorCode"`
	ErrorMessage           string          `json:"errorMessage"`
	Payload                json.RawMessage `json:"payload,omitempty"`
	IssuedCertificateChain []string        `json:"issuedCertificateChain"`
}

// ServiceError is DPS's ProvisioningServiceErrorDetails, the body of 4xx and
// 5xx answers.
type ServiceError struct {
	ErrorCode    int64  `json:"errorCode"`
	TrackingID   string `json:"trackingId"`
	Message      string `json:"message"`
	TimestampUTC string `json:"timestampUtc"`
}

// response is one answer on $dps/registrations/res/{status}/?$rid=..
type response struct {
	status     int
	rid        string
	retryAfter time.Duration // 0 when absent or unparsable
}

// parseResponseTopic parses a DPS response topic. Query keys are matched
// case-insensitively, as the C# SDK does.
func parseResponseTopic(topic string) (response, error) {
	rest, ok := strings.CutPrefix(topic, dpsResPrefix)
	if !ok {
		return response{}, fmt.Errorf("unexpected DPS topic %q", topic)
	}
	statusStr, query, ok := strings.Cut(rest, "/?")
	if !ok {
		return response{}, fmt.Errorf("DPS response topic %q has no query", topic)
	}
	status, err := strconv.Atoi(statusStr)
	if err != nil || status < 100 || status > 999 {
		return response{}, fmt.Errorf("DPS response topic %q has no valid status", topic)
	}
	r := response{status: status}
	q, err := url.ParseQuery(query)
	if err != nil {
		return response{}, fmt.Errorf("DPS response topic %q: bad query: %v", topic, err)
	}
	for k, v := range q {
		switch strings.ToLower(k) {
		case "$rid":
			r.rid = v[0]
		case "retry-after":
			if n, err := strconv.Atoi(v[0]); err == nil && n > 0 {
				r.retryAfter = time.Duration(n) * time.Second
			}
		}
	}
	return r, nil
}

// decodeOperation decodes a 200/202 body.
func decodeOperation(body []byte) (*Operation, error) {
	var op Operation
	if err := json.Unmarshal(body, &op); err != nil {
		return nil, fmt.Errorf("%w: DPS answer is not a registration status: %v", ErrMalformedReply, err)
	}
	switch op.Status {
	case StatusUnassigned, StatusAssigning, StatusAssigned, StatusFailed, StatusDisabled:
	default:
		return nil, fmt.Errorf("%w: DPS answer has unknown status %q", ErrMalformedReply, op.Status)
	}
	if op.OperationID == "" {
		return nil, fmt.Errorf("%w: DPS answer has no operationId", ErrMalformedReply)
	}
	if op.Status == StatusAssigned {
		rs := op.RegistrationState
		if rs == nil || rs.AssignedHub == "" || rs.DeviceID == "" {
			return nil, fmt.Errorf("%w: DPS says assigned but gives no assignedHub and deviceId", ErrMalformedReply)
		}
	}
	return &op, nil
}

// decodeServiceError decodes an error body; an undecodable body still yields
// an error with the status. retryAfter is the answer's (0 if none).
func decodeServiceError(status int, retryAfter time.Duration, body []byte) *DPSError {
	e := &DPSError{Status: status, After: retryAfter}
	var se ServiceError
	if json.Unmarshal(body, &se) == nil {
		e.Code, e.Message, e.TrackingID = se.ErrorCode, se.Message, se.TrackingID
	}
	return e
}

// DPSError is an error answer from DPS.
type DPSError struct {
	Status     int    // 400, 401, 404, 429, 500, ...
	Code       int64  // extended code, e.g. 401002
	Message    string // DPS's message
	TrackingID string
	After      time.Duration // DPS's retry-after (0 if it sent none)
}

func (e *DPSError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "DPS answered %d", e.Status)
	if e.Code != 0 {
		fmt.Fprintf(&b, " (error %d)", e.Code)
	}
	if e.Message != "" {
		fmt.Fprintf(&b, ": %s", e.Message)
	}
	if e.TrackingID != "" {
		fmt.Fprintf(&b, " [tracking id %s]", e.TrackingID)
	}
	switch {
	case e.Status == 401 || e.Status == 403:
		b.WriteString("; the onboarding credential was rejected: check the id scope, registration id and the certificate chain, symmetric key or TPM endorsement key enrolled for this device")
	case e.Status == 404:
		b.WriteString("; DPS does not know this device: check the id scope and that an enrollment exists")
	case e.Status == 400:
		b.WriteString("; DPS refused the request as malformed")
	}
	return b.String()
}

// Permanent reports whether retrying cannot help: every answer but 429 and
// 5xx (the C# SDK's rule). internal/retry classifies by it.
func (e *DPSError) Permanent() bool { return e.Status != 429 && e.Status < 500 }

// RetryAfter is DPS's retry-after (internal/retry reads it).
func (e *DPSError) RetryAfter() time.Duration { return e.After }

// Sentinel errors of the provisioning package.
var (
	// ErrMalformedReply: DPS sent something gwagent cannot use.
	ErrMalformedReply = errors.New("malformed DPS reply")
	// ErrBadChain: the issued chain failed validation; nothing was stored.
	ErrBadChain = errors.New("issued certificate chain rejected")
)

// DecodeChain decodes issuedCertificateChain (or the hub's certificates
// array): each element base64 DER, or PEM (accepted for robustness; see the
// protocol notes). The result is leaf first as sent.
func DecodeChain(elems []string) ([]*x509.Certificate, error) {
	if len(elems) == 0 {
		return nil, fmt.Errorf("%w: the chain is empty (did the request carry a CSR and a recent api-version?)", ErrBadChain)
	}
	if len(elems) > 8 {
		return nil, fmt.Errorf("%w: %d certificates is more than any issuing hierarchy has", ErrBadChain, len(elems))
	}
	var out []*x509.Certificate
	for i, s := range elems {
		var ders [][]byte
		if strings.Contains(s, "-----BEGIN") {
			rest := []byte(s)
			for {
				var b *pem.Block
				b, rest = pem.Decode(rest)
				if b == nil {
					break
				}
				if b.Type == "CERTIFICATE" {
					ders = append(ders, b.Bytes)
				}
			}
			if len(ders) == 0 {
				return nil, fmt.Errorf("%w: element %d is PEM without a CERTIFICATE block", ErrBadChain, i)
			}
		} else {
			der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
			if err != nil {
				return nil, fmt.Errorf("%w: element %d is neither base64 DER nor PEM", ErrBadChain, i)
			}
			ders = [][]byte{der}
		}
		for _, der := range ders {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return nil, fmt.Errorf("%w: element %d: %v", ErrBadChain, i, err)
			}
			out = append(out, c)
		}
	}
	return out, nil
}
