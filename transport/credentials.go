package transport

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/gwagent/gwagent/internal/clock"
)

// ErrNoCertificateManagement: the hub refused the subscription to the
// certificate-signing API's answers (SUBACK 0x80): it does not offer
// certificate management. Renew through DPS instead.
var ErrNoCertificateManagement = errors.New("the hub does not offer certificate management (it refused the $iothub/credentials subscription)")

// ErrCredentialsUnanswered: the hub did not acknowledge a certificate
// request with 202: it stayed silent until the accept timeout or the
// connection ended first. The hub never committed to the request.
var ErrCredentialsUnanswered = errors.New("the hub did not answer the certificate request")

// subackErr checks the return codes of a SUBACK against the request.
func subackErr(result map[string]byte, asked map[string]byte) error {
	for f := range asked {
		code, ok := result[f]
		switch {
		case !ok:
			return fmt.Errorf("hub: subscribe: no SUBACK code for %s", f)
		case code == 0x80 && f == credentialsResSub:
			return fmt.Errorf("hub: subscribe %s: %w", f, ErrNoCertificateManagement)
		case code == 0x80:
			return fmt.Errorf("hub: subscribe %s: refused by the hub (SUBACK 0x80)", f)
		case code > 2:
			return fmt.Errorf("hub: subscribe %s: unexpected SUBACK code %#x", f, code)
		}
	}
	return nil
}

// WatchCredentials subscribes to the certificate-signing API's answers on
// this connection, once; IssueCertificate does it itself. Call it after a
// reconnect while a request the hub accepted is still pending, so that the
// answer reaches Config.OnCredentials.
func (s *Session) WatchCredentials(ctx context.Context) error {
	s.mu.Lock()
	done := s.credSubscribed
	s.mu.Unlock()
	if done {
		return nil
	}
	if err := s.subscribe(ctx, map[string]byte{credentialsResSub: 0}); err != nil {
		return err
	}
	s.mu.Lock()
	s.credSubscribed = true
	s.mu.Unlock()
	return nil
}

// unwatchCredentials ends the subscription once no answer is awaited.
func (s *Session) unwatchCredentials() {
	s.mu.Lock()
	if !s.credSubscribed {
		s.mu.Unlock()
		return
	}
	s.credSubscribed = false
	s.mu.Unlock()
	_, _ = s.do(context.Background(), &call{other: func() mqtt.Token { return s.client.Unsubscribe(credentialsResSub) }}, 10*time.Second) // best effort: the next connection starts without it
}

// IssueRequest is one call of the hub's certificate-signing API
// (azure-protocol §2.5).
type IssueRequest struct {
	// RID identifies the request; the final answer may arrive on a later
	// connection, so the caller keeps it. Empty: one is generated.
	RID string
	// CSR is the PKCS#10 request in DER; CN must be the device id.
	CSR []byte
	// Replace, if set, supersedes an active request ("*" for any).
	Replace string
	// AcceptTimeout bounds the wait for the 202 (default 90 s, as the SDKs).
	AcceptTimeout time.Duration
	// After the 202 the wait lasts until the operationExpires it carries
	// (issuance may take hours), or AnswerWait when it carries none, but
	// never past Latest (if set).
	AnswerWait time.Duration
	Latest     time.Time
	// Accepted, if not nil, is called once the hub committed the request
	// (202), with the end of the wait for the certificate.
	Accepted func(rid, correlationID string, until time.Time)
}

// answerDeadline is the end of the wait after a 202 with operationExpires
// expires (zero if absent), at now.
func (r IssueRequest) answerDeadline(now, expires time.Time) time.Time {
	until := expires
	if until.IsZero() {
		until = now.Add(r.AnswerWait)
	}
	if !r.Latest.IsZero() && r.Latest.Before(until) {
		until = r.Latest
	}
	return until
}

// IssueError is the hub's error answer to a certificate-signing request.
type IssueError struct {
	Status     int
	Code       int    // errorCode, e.g. 409005
	Message    string // the hub's message
	Credential string // info.credentialError, e.g. FailedToDecodeCsr
	// ActiveRID is the request already in flight (409), which lasts until
	// ActiveExpires (info.operationExpires, zero if not given).
	ActiveRID     string
	ActiveExpires time.Time
	// After is the hub's retry-after (zero if it sent none).
	After time.Duration
}

// RetryAfter is the hub's retry-after (internal/retry reads it).
func (e *IssueError) RetryAfter() time.Duration { return e.After }

func (e *IssueError) Error() string {
	s := "hub certificate API answered " + strconv.Itoa(e.Status)
	if e.Code != 0 {
		s += " (" + strconv.Itoa(e.Code) + ")"
	}
	if e.Credential != "" {
		s += " " + e.Credential
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Permanent reports whether retrying the same request cannot help: a bad
// CSR, an unknown device, a tier without the API.
func (e *IssueError) Permanent() bool {
	return e.Status == 400 || e.Status == 403 || e.Status == 404 || e.Status == 412
}

// IsIssueStatus reports whether err is an IssueError with that status.
func IsIssueStatus(err error, status int) bool {
	var ie *IssueError
	return errors.As(err, &ie) && ie.Status == status
}

// IssueCertificate sends a CSR to $iothub/credentials/POST/issueCertificate
// and waits for the 202 and then the final answer on this connection. It
// returns the certificates as sent (base64 DER or PEM, leaf first); decode
// and validate them before use. If the connection drops after the 202, the
// answer may come on a later session through Config.OnCredentials.
func (s *Session) IssueCertificate(ctx context.Context, req IssueRequest) ([]string, error) {
	if req.RID == "" {
		req.RID = s.newRID()
	}
	if req.AcceptTimeout <= 0 {
		req.AcceptTimeout = 90 * time.Second
	}
	body := map[string]string{"id": s.cfg.DeviceID, "csr": base64.StdEncoding.EncodeToString(req.CSR)}
	if req.Replace != "" {
		body["replace"] = req.Replace
	}
	payload, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	if err := s.WatchCredentials(ctx); err != nil {
		return nil, err
	}
	ch, done := s.expect(req.RID)
	defer done()
	if err := s.publishRequest(ctx, credentialsTopic, req.RID, payload); err != nil {
		return nil, err
	}
	// Until the 202, the accept timeout bounds the wait; after it, only ctx.
	acceptCtx, cancel := context.WithTimeout(ctx, req.AcceptTimeout)
	defer cancel()
	waitCtx := acceptCtx
	var a answer
	for {
		a, err = s.next(waitCtx, ch)
		if err != nil {
			// The session's end cancels a caller's session-scoped ctx too:
			// a connection that dropped before the 202 is an unanswered
			// request whichever of the two was seen first.
			if waitCtx == acceptCtx && (ctx.Err() == nil || s.ended()) {
				if acceptCtx.Err() != nil {
					return nil, fmt.Errorf("hub: certificate request %s: %w within %s", req.RID, ErrCredentialsUnanswered, req.AcceptTimeout)
				}
				return nil, fmt.Errorf("hub: certificate request %s: %w: %w", req.RID, ErrCredentialsUnanswered, err)
			}
			return nil, fmt.Errorf("hub: certificate request %s: %w", req.RID, err)
		}
		if a.status != 202 {
			break
		}
		if waitCtx == acceptCtx {
			var b struct {
				CorrelationID    string `json:"correlationId"`
				OperationExpires string `json:"operationExpires"`
			}
			_ = json.Unmarshal(a.body, &b)
			// The hub's date, judged on the session's clock.
			until := req.answerDeadline(s.cfg.Clock.Now(), parseExpires(b.OperationExpires))
			var cancelAnswer context.CancelFunc
			waitCtx, cancelAnswer = clock.WithDeadline(ctx, s.cfg.Clock, until)
			defer cancelAnswer()
			if req.Accepted != nil {
				req.Accepted(req.RID, b.CorrelationID, until)
			}
		}
	}
	// A final answer: nothing more to wait for on this connection.
	s.unwatchCredentials()
	return ParseIssueAnswer(a.status, a.body, retryAfter(a))
}

// ParseIssueAnswer interprets a final answer of the certificate-signing
// API: on 200 the certificates, else an *IssueError. Both documented forms
// of the 200 body are accepted: {"certificates":[...]} and a bare array.
func ParseIssueAnswer(status int, body []byte, retry time.Duration) ([]string, error) {
	if status == 200 {
		var obj struct {
			Certificates []string `json:"certificates"`
		}
		if err := json.Unmarshal(body, &obj); err == nil && len(obj.Certificates) > 0 {
			return obj.Certificates, nil
		}
		var arr []string
		if err := json.Unmarshal(body, &arr); err == nil && len(arr) > 0 {
			return arr, nil
		}
		return nil, fmt.Errorf("hub: certificate answer 200 without certificates: %s", truncate(body, 200))
	}
	var e struct {
		ErrorCode  int    `json:"errorCode"`
		Message    string `json:"message"`
		RetryAfter int    `json:"retryAfter"`
		Info       struct {
			CredentialError  string `json:"credentialError"`
			RequestID        string `json:"requestId"`
			OperationExpires string `json:"operationExpires"`
		} `json:"info"`
	}
	_ = json.Unmarshal(body, &e)
	ie := &IssueError{Status: status, Code: e.ErrorCode, Message: e.Message, Credential: e.Info.CredentialError,
		ActiveRID: e.Info.RequestID, ActiveExpires: parseExpires(e.Info.OperationExpires), After: retry}
	if ie.After == 0 && e.RetryAfter > 0 {
		ie.After = time.Duration(e.RetryAfter) * time.Second
	}
	return nil, ie
}

// parseExpires reads operationExpires (RFC 3339, fractional seconds
// optional); zero when absent or malformed.
func parseExpires(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}
	}
	return t
}
