{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "scim-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name if it contains the chart name, else <release>-<chart>. */}}
{{- define "scim-token-operator.fullname" -}}
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

{{- define "scim-token-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scim-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scim-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "scim-token-operator.labels" -}}
helm.sh/chart: {{ include "scim-token-operator.chart" . }}
{{ include "scim-token-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "scim-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scim-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The one namespace to watch, or "" for all namespaces. The binary watches one namespace or all of
them (WATCH_NAMESPACE takes a single name), so a longer list is refused rather than silently
watching only its first entry.
*/}}
{{- define "scim-token-operator.watchNamespace" -}}
{{- $namespaces := .Values.watchNamespaces | default list }}
{{- if gt (len $namespaces) 1 }}
{{- fail (printf "watchNamespaces lists %d namespaces (%s), but the operator watches either one namespace or all of them. Set at most one entry (an empty list watches all namespaces), or install one release per namespace, each with its own single watchNamespaces entry." (len $namespaces) (join ", " $namespaces)) }}
{{- end }}
{{- if $namespaces }}{{ first $namespaces }}{{ end }}
{{- end }}

{{/* "true" when leader election is on: requested, or forced by more than one replica. */}}
{{- define "scim-token-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/* Name of the leader-election Lease (in the release namespace). */}}
{{- define "scim-token-operator.leaseName" -}}
{{- include "scim-token-operator.fullname" . }}
{{- end }}

{{- define "scim-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}
