{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "txn-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, unless it already contains the chart name. */}}
{{- define "txn-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "txn-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels. */}}
{{- define "txn-sidecar.labels" -}}
helm.sh/chart: {{ include "txn-sidecar.chart" . }}
{{ include "txn-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Immutable once a Deployment exists: keep to name + instance. */}}
{{- define "txn-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "txn-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "txn-sidecar.appImage" -}}
{{- if .Values.app.image.tag }}
{{- printf "%s:%s" .Values.app.image.repository .Values.app.image.tag }}
{{- else }}
{{- .Values.app.image.repository }}
{{- end }}
{{- end }}

{{- define "txn-sidecar.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/* The port of sidecar.config.adminAddr ("0.0.0.0:9464", "[::]:9464"). */}}
{{- define "txn-sidecar.adminPort" -}}
{{- regexReplaceAll "^.*:" .Values.sidecar.config.adminAddr "" }}
{{- end }}

{{- define "txn-sidecar.group" -}}
{{- default (include "txn-sidecar.fullname" .) .Values.sidecar.config.group }}
{{- end }}

{{- define "txn-sidecar.appUrl" -}}
{{- default (printf "http://127.0.0.1:%d/transactions" (int .Values.app.port)) .Values.sidecar.config.appUrl }}
{{- end }}

{{/*
Seconds in a duration string such as "20s", "1m 30s" or "500ms" (the forms
values.schema.json admits), as a float.
*/}}
{{- define "txn-sidecar.durationSeconds" -}}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(ns|us|ms|s|m|h|d)" . -1 }}
{{- $n := regexFind "^[0-9]+" . | float64 }}
{{- $unit := regexReplaceAll "^[0-9]+" . "" }}
{{- $scale := get (dict "ns" 0.000000001 "us" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0) $unit }}
{{- $total = addf $total (mulf $n $scale) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
txn-sidecar.toml. Strings go through toJson: a JSON string is a valid TOML
basic string, so quotes, backslashes and non-ASCII survive. [kafka] values
are all written as strings (librdkafka properties are strings); whole
numbers are converted through int64 first, because Helm reads YAML numbers
as float64 and 1048576 would otherwise print as "1.048576e+06".
*/}}
{{- define "txn-sidecar.toml" -}}
{{- $c := .Values.sidecar.config -}}
# Rendered by the txn-sidecar Helm chart from .Values.sidecar.config.
brokers = {{ $c.brokers | toJson }}
topic = {{ $c.topic | toJson }}
group = {{ include "txn-sidecar.group" . | toJson }}
protocol = {{ $c.protocol | toJson }}
{{- with $c.dlqTopic }}
dlq_topic = {{ . | toJson }}
{{- end }}
txn_timeout = {{ $c.txnTimeout | toJson }}
on_failure = {{ $c.onFailure | toJson }}
shutdown_grace = {{ $c.shutdownGrace | toJson }}
log_format = {{ $c.logFormat | toJson }}

[app]
url = {{ include "txn-sidecar.appUrl" . | toJson }}

[admin]
addr = {{ $c.adminAddr | toJson }}
{{- with $c.maxStagedBytes }}

[limits]
max_staged_bytes = {{ . | toJson }}
{{- end }}

[kafka]
{{- range $key, $value := $c.kafka }}
{{- if kindIs "float64" $value }}
{{ $key | toJson }} = {{ $value | int64 | toString | toJson }}
{{- else }}
{{ $key | toJson }} = {{ $value | toString | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The sidecar container. Called with (dict "ctx" $ "native" bool): a native
sidecar gets restartPolicy: Always, which is what makes an init container a
sidecar.
*/}}
{{- define "txn-sidecar.sidecarContainer" -}}
{{- $ := .ctx -}}
{{- $v := $.Values.sidecar -}}
- name: txn-sidecar
  image: {{ include "txn-sidecar.sidecarImage" $ | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    - name: TXN_SIDECAR_CONFIG
      value: /etc/txn-sidecar/txn-sidecar.toml
    {{- if $v.existingSecret }}
    - name: TXN_SIDECAR_KAFKA_SASL_USERNAME
      valueFrom:
        secretKeyRef:
          name: {{ $v.existingSecret | quote }}
          key: {{ $v.existingSecretKeys.username | quote }}
    - name: TXN_SIDECAR_KAFKA_SASL_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ $v.existingSecret | quote }}
          key: {{ $v.existingSecretKeys.password | quote }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: admin
      containerPort: {{ include "txn-sidecar.adminPort" $ }}
      protocol: TCP
  {{- /* /healthz, not /readyz: the app starts only after this succeeds, and
       readiness needs the app to answer. */}}
  startupProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml $v.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml $v.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: admin
    {{- toYaml $v.probes.readiness | nindent 4 }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: txn-sidecar-config
      mountPath: /etc/txn-sidecar
      readOnly: true
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
